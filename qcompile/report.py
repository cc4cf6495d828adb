"""Markdown and self-contained HTML reports, with plots, from one JSON-ready dict.

Both formats are rendered from the same list of blocks (heading, paragraph, table, image, code), so
they hold the same sections in the same order: title, summary, gate, candidates, layers, precision
per op type, budget search, extra tables, environment, command. Plots are drawn with matplotlib's
Agg canvas directly (no pyplot, so a user's backend is left alone) and embedded as base64 PNG data
URLs: each file stands alone, with no scripts and no external resources.
"""

from __future__ import annotations

import base64
import html
import importlib.metadata
import io
import math
import platform
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

import onnx_ir as ir
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from qcompile.errors import InputSpecError
from qcompile.modelio import write_text

#: Report file suffixes and their renderers' names.
SUFFIXES = (".md", ".html", ".htm")
DPI = 96
#: The SQNR chart shows this many of the worst layers; the layer table at most MAX_LAYER_ROWS.
WORST_LAYERS = 40
MAX_LAYER_ROWS = 200
LABEL_CHARS = 36

_CORE_PACKAGES = ("qcompile-onnx", "onnx", "onnxruntime", "onnx-ir", "onnxscript", "numpy", "matplotlib")
_OPTIONAL_PACKAGES = ("ray", "torch", "onnxruntime-gpu", "tensorrt")


# --- environment -----------------------------------------------------------------------------------

def environment() -> dict[str, Any]:
    """Python, platform, package versions (metadata only: nothing heavy is imported), CPU and GPU."""
    from qcompile.targets.ort_cpu.kernel_probe import cpu_signature

    packages: dict[str, str | None] = {}
    for name in _CORE_PACKAGES + _OPTIONAL_PACKAGES:
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            if name in _CORE_PACKAGES:
                packages[name] = None
    return {"python": platform.python_version(), "implementation": sys.implementation.name,
            "platform": platform.platform(), "machine": platform.machine(), "packages": packages,
            "cpu": cpu_signature(), "gpu": _gpu_name()}


def _gpu_name() -> str | None:
    """The GPU names nvidia-smi reports, or None without nvidia-smi (or when it fails)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        proc = subprocess.run([exe, "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    names = [line.strip() for line in proc.stdout.splitlines() if line.strip()]
    return ", ".join(names) if proc.returncode == 0 and names else None


# --- precision per op type -------------------------------------------------------------------------

_SKIPPED = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "Cast", "CastLike", "Constant"})
_INT64_OUT = frozenset({"Shape", "Size", "ArgMax", "ArgMin", "NonZero", "NonMaxSuppression"})
_BOOL_OUT = frozenset({"Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Not", "And", "Or", "Xor",
                       "IsNaN", "IsInf"})
_INT8_OPS = frozenset({"MatMulInteger", "ConvInteger"})
_FLOATS = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE})
_NAMES = {ir.DataType.FLOAT: "fp32", ir.DataType.FLOAT16: "fp16", ir.DataType.BFLOAT16: "bf16",
          ir.DataType.DOUBLE: "fp64", ir.DataType.FLOAT8E4M3FN: "fp8"}


def _dtype_name(dtype: ir.DataType | None) -> str:
    if dtype is None:
        return "unknown"
    return _NAMES.get(dtype, dtype.name.lower())


def _const_dtype(node: ir.Node) -> ir.DataType | None:
    """The element type a Constant node produces (from its attribute; the tensor is not read)."""
    for key, dtype in (("value_float", ir.DataType.FLOAT), ("value_floats", ir.DataType.FLOAT),
                       ("value_int", ir.DataType.INT64), ("value_ints", ir.DataType.INT64),
                       ("value_string", ir.DataType.STRING), ("value_strings", ir.DataType.STRING)):
        if key in node.attributes:
            return dtype
    attr = node.attributes.get("value") or node.attributes.get("sparse_value")
    tensor = attr.value if attr is not None else None
    return getattr(tensor, "dtype", None)


def _topological(graph: ir.Graph) -> list[ir.Node]:
    """The graph's nodes, producers before consumers, whatever order they are stored in."""
    nodes = list(graph)
    members = set(nodes)
    waiting = {node: {v.producer() for v in node.inputs if v is not None and v.producer() in members} - {node}
               for node in nodes}
    consumers: dict[ir.Node, list[ir.Node]] = {node: [] for node in nodes}
    for node, producers in waiting.items():
        for producer in producers:
            consumers[producer].append(node)
    ready = [node for node in nodes if not waiting[node]]
    order: list[ir.Node] = []
    while ready:
        node = ready.pop(0)
        order.append(node)
        for consumer in consumers[node]:
            waiting[consumer].discard(node)
            if not waiting[consumer]:
                ready.append(consumer)
    seen = set(order)
    return order + [node for node in nodes if node not in seen]  # a cycle: keep the stored order


def _output_dtype(node: ir.Node, known: dict[ir.Value, ir.DataType]) -> ir.DataType | None:
    """The element type of the node's outputs, from its inputs' (an approximation for a few ops)."""
    def of(i: int) -> ir.DataType | None:
        value = node.inputs[i] if i < len(node.inputs) else None
        return known.get(value) if value is not None else None

    attr = node.attributes.get("output_dtype")
    explicit = ir.DataType(attr.value) if attr is not None and attr.value else None
    op = node.op_type
    if op == "Cast":
        return ir.DataType(node.attributes["to"].value) if "to" in node.attributes else None
    if op == "CastLike":
        return of(1)
    if op == "Constant":
        return _const_dtype(node)
    if op == "DequantizeLinear":
        return explicit or of(1)
    if op in ("QuantizeLinear", "DynamicQuantizeLinear"):
        return of(2) or explicit or ir.DataType.UINT8
    if op in _INT64_OUT:
        return ir.DataType.INT64
    if op in _BOOL_OUT:
        return ir.DataType.BOOL
    if op in _INT8_OPS:
        return ir.DataType.INT32
    return next((known[v] for v in node.inputs if v is not None and v in known), None)


def _is_weight(value: ir.Value) -> bool:
    producer = value.producer()
    return value.is_initializer() or (producer is not None and producer.op_type == "Constant")


def _precision(node: ir.Node, known: dict[ir.Value, ir.DataType]) -> str:
    """The precision a compute node runs in (see :func:`precision_by_op`)."""
    if node.op_type == "MatMulNBits" and node.domain == "com.microsoft":
        bits = node.attributes.get("bits")
        return f"int{bits.value if bits is not None else 4}"
    if node.op_type.startswith("QLinear") or node.op_type in _INT8_OPS:
        return "int8"
    quantized: list[tuple[bool, ir.DataType]] = []  # (weight?, quantized dtype) per DQ input
    for value in node.inputs:
        producer = value.producer() if value is not None else None
        if producer is not None and producer.op_type == "DequantizeLinear" and producer.inputs[0] is not None:
            source = producer.inputs[0]
            dtype = known.get(source)
            if dtype is not None:
                quantized.append((_is_weight(source), dtype))
    if quantized:
        weights = [d for w, d in quantized if w] or [d for _, d in quantized]
        return _dtype_name(min(weights, key=lambda d: d.bitwidth))
    typed = [known[v] for v in node.inputs if v is not None and v in known]
    floats = [d for d in typed if d in _FLOATS]
    return _dtype_name(floats[0] if floats else typed[0] if typed else None)


def precision_by_op(model: ir.Model) -> dict[str, dict[str, int]]:
    """Counts of the main graph's compute nodes per op type and precision, e.g. ``{"MatMul": {"int8": 30}}``.

    Quantize/Dequantize, Cast and Constant nodes are conversions, not computations, and are not
    counted. Element types are propagated from the graph inputs and initializers (intermediate
    types may have been cleared); only metadata is read, never a weight's bytes.
    """
    graph = model.graph
    known: dict[ir.Value, ir.DataType] = {}
    for value in [*graph.inputs, *graph.initializers.values()]:
        dtype = value.dtype if value.dtype is not None else getattr(value.const_value, "dtype", None)
        if dtype is not None:
            known[value] = dtype
    counts: dict[str, Counter[str]] = {}
    for node in _topological(graph):
        dtype = _output_dtype(node, known)
        for out in node.outputs:
            if out.dtype is not None:
                known[out] = out.dtype
            elif dtype is not None:
                known[out] = dtype
        if node.op_type not in _SKIPPED:
            counts.setdefault(node.op_type, Counter())[_precision(node, known)] += 1
    return {op: dict(sorted(counts[op].items())) for op in sorted(counts)}


# --- Pareto front ----------------------------------------------------------------------------------

def _num(value: Any) -> float | None:
    """A float from a float, int or string ("inf", "nan"); None for None, bools and anything else."""
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def pareto_front(points: list[tuple[float, float]], higher_is_better: bool) -> list[int]:
    """Indices of the non-dominated (latency, metric) points, by increasing latency.

    Lower latency is better, and a higher (or lower) metric. A point is dominated by one at least as
    good in both and better in one; equal points are all kept. Points with a None or NaN latency
    or metric are left out.
    """
    sign = 1.0 if higher_is_better else -1.0
    valid = []
    for i, (lat, met) in enumerate(points):
        lat, met = _num(lat), _num(met)
        if lat is not None and met is not None and not math.isnan(lat) and not math.isnan(met):
            valid.append((lat, -sign * met, i))  # sorted: fastest first, best metric first
    valid.sort()
    front: list[int] = []
    best: float | None = None  # the best metric among strictly faster points
    k = 0
    while k < len(valid):
        group = [p for p in valid[k:] if p[0] == valid[k][0]]
        top = group[0][1]
        front.extend(i for _, m, i in group if m == top and (best is None or -m > best))
        best = -top if best is None else max(best, -top)
        k += len(group)
    return front


# --- plots -----------------------------------------------------------------------------------------

def _label(text: Any, limit: int = LABEL_CHARS) -> str:
    """A plot label: shortened in the middle, and ``$`` escaped (matplotlib would read it as mathtext)."""
    text = " ".join(str(text).split())
    if len(text) > limit:
        head = (limit - 1) // 2
        text = text[:head] + "…" + text[len(text) - (limit - 1 - head):]
    return text.replace("$", r"\$")


def _finite(value: Any) -> bool:
    number = _num(value)
    return number is not None and math.isfinite(number)


def _png(fig: Figure) -> str:
    """The figure as base64 PNG (no software metadata, so equal data gives equal bytes)."""
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _candidates_plot(data: dict) -> str | None:
    name = _label(data.get("metric_name", "metric"))
    rows = [c for c in data.get("candidates", []) if _finite(c.get("latency_ms")) and _finite(c.get("metric"))]
    if not rows:
        return None
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    for flag, colour, text in ((True, "tab:green", "within budget"), (False, "tab:red", "over budget"),
                               (None, "tab:gray", "budget unknown")):
        group = [c for c in rows if c.get("within_budget") is flag]
        if group:
            ax.scatter([_num(c["latency_ms"]) for c in group], [_num(c["metric"]) for c in group], c=colour,
                       label=text, zorder=3)
    points = [(_num(c["latency_ms"]), _num(c["metric"])) for c in rows]
    front = pareto_front(points, bool(data.get("higher_is_better", True)))
    ax.step([points[i][0] for i in front], [points[i][1] for i in front], where="post", color="tab:blue",
            label="Pareto front", zorder=2)
    for c in rows:
        if c.get("chosen"):
            ax.scatter([_num(c["latency_ms"])], [_num(c["metric"])], s=220, facecolors="none", edgecolors="black",
                       linewidths=2, label="chosen", zorder=4)
        if len(rows) <= 20:
            ax.annotate(_label(c.get("name", ""), 20), (_num(c["latency_ms"]), _num(c["metric"])), fontsize=7,
                        xytext=(4, 4), textcoords="offset points")
    ax.set(xlabel="latency (ms)", ylabel=name, title=f"candidates: latency vs {name}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def _sqnr_key(layer: dict, field: str) -> float:
    value = _num(layer.get(field))
    return math.inf if value is None or math.isnan(value) else value


def _sqnr_field(layers: list[dict]) -> str:
    return "local_sqnr_db" if any(_num(x.get("local_sqnr_db")) is not None for x in layers) else "sqnr_db"


def _layers_plot(layers: list[dict]) -> str | None:
    field = _sqnr_field(layers)
    worst = sorted((x for x in layers if _finite(x.get(field))), key=lambda x: _sqnr_key(x, field))[:WORST_LAYERS]
    if not worst:
        return None
    fig = Figure(figsize=(7, 1.2 + 0.22 * len(worst)))
    ax = fig.add_subplot()
    colours = ["tab:orange" if x.get("kind") == "weight" else "tab:blue" for x in worst]
    ax.barh(range(len(worst)), [_num(x[field]) for x in worst], color=colours)
    ax.set_yticks(range(len(worst)), [_label(x.get("tensor", "?")) for x in worst], fontsize=7)
    ax.invert_yaxis()
    ax.set(xlabel=f"{field.replace('_db', '')} (dB)", title=f"worst {len(worst)} layers by {field}")
    ax.legend(handles=[Patch(color="tab:blue", label="activation"), Patch(color="tab:orange", label="weight")],
              fontsize=8, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def _precision_plot(counts: dict[str, dict[str, int]]) -> str | None:
    ops = [op for op in counts if sum(counts[op].values())]
    if not ops:
        return None
    precisions = sorted({p for op in ops for p in counts[op]})
    fig = Figure(figsize=(7, 1.2 + 0.3 * len(ops)))
    ax = fig.add_subplot()
    left = [0.0] * len(ops)
    for precision in precisions:
        widths = [float(counts[op].get(precision, 0)) for op in ops]
        ax.barh(range(len(ops)), widths, left=left, label=_label(precision))
        left = [a + b for a, b in zip(left, widths)]
    ax.set_yticks(range(len(ops)), [_label(op) for op in ops], fontsize=8)
    ax.invert_yaxis()
    ax.set(xlabel="nodes", title="precision per op type")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def _search_plot(data: dict) -> str | None:
    trials = [t for t in data.get("search", []) if _finite(t.get("metric")) and _finite(t.get("trial"))]
    if not trials:
        return None
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    ax.plot([_num(t["trial"]) for t in trials], [_num(t["metric"]) for t in trials], color="tab:gray", zorder=1)
    for flag, colour, text in ((True, "tab:green", "within budget"), (False, "tab:red", "over budget")):
        group = [t for t in trials if bool(t.get("within_budget")) is flag]
        if group:
            ax.scatter([_num(t["trial"]) for t in group], [_num(t["metric"]) for t in group], c=colour, label=text,
                       zorder=3)
    budget = data.get("budget") or {}
    if _finite(budget.get("limit")):
        ax.axhline(_num(budget["limit"]), color="tab:red", linestyle="--", label="budget limit")
    if _finite(budget.get("reference")):
        ax.axhline(_num(budget["reference"]), color="tab:blue", linestyle=":", label="reference")
    name = _label(budget.get("metric") or data.get("metric_name", "metric"))
    ax.set(xlabel="trial", ylabel=name, title=f"budget search: {name} per trial")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


# --- blocks ----------------------------------------------------------------------------------------

def _fmt(value: Any) -> str:
    """A cell: floats with 6 significant digits, non-finite as inf/-inf/nan, None as a dash."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    return str(value)


def _verdict(passed: Any) -> str:
    return "PASS" if passed else "FAIL"


def _flatten(mapping: dict, prefix: str = "") -> Iterable[tuple[str, Any]]:
    for key, value in mapping.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _blocks(data: dict) -> list[tuple]:
    """The report as blocks: ("h1"|"h2"|"p"|"code", text), ("img", alt, base64), ("table", cols, rows)."""
    if not isinstance(data, dict) or "title" not in data:
        raise InputSpecError("report data has no 'title'", where="report", fix="pass a dict with a 'title' key")
    out: list[tuple] = [("h1", str(data["title"]))]

    def image(png: str | None, alt: str) -> None:
        if png is not None:
            out.append(("img", alt, png))

    if data.get("summary"):
        out += [("h2", "Summary"), ("table", ["item", "value"], [[_fmt(k), _fmt(v)] for k, v in data["summary"]])]
    gate = data.get("gate")
    if gate:
        out += [("h2", "Gate"), ("p", f"{gate.get('metric', 'metric')}: reference {_fmt(_num(gate.get('reference')))}"
                                      f", candidate {_fmt(_num(gate.get('candidate')))}, drop "
                                      f"{_fmt(_num(gate.get('drop')))} — {_verdict(gate.get('passed'))}")]
        checks = gate.get("checks") or []
        if checks:
            out.append(("table", ["check", "value", "limit", "verdict"],
                        [[_fmt(c.get("name")), _fmt(_num(c.get("value"))), _fmt(c.get("limit")),
                          _verdict(c.get("passed"))] for c in checks]))
    metric = str(data.get("metric_name", "metric"))
    candidates = data.get("candidates") or []
    if candidates:
        front = set(pareto_front([(c.get("latency_ms"), c.get("metric")) for c in candidates],
                                 bool(data.get("higher_is_better", True))))
        out += [("h2", "Candidates"),
                ("table", ["name", "latency (ms)", metric, "within budget", "Pareto", "chosen"],
                 [[_fmt(c.get("name")), _fmt(_num(c.get("latency_ms"))), _fmt(_num(c.get("metric"))),
                   _fmt(c.get("within_budget")), _fmt(i in front), _fmt(bool(c.get("chosen")))]
                  for i, c in enumerate(candidates)])]
        image(_candidates_plot(data), f"scatter of latency (ms) against {metric} for {len(candidates)} candidates, "
                                      "with the Pareto front and the chosen candidate")
    layers = data.get("layers") or []
    if layers:
        field = _sqnr_field(layers)
        ranked = sorted(layers, key=lambda x: _sqnr_key(x, field))
        out += [("h2", "Layers"), ("p", f"{len(layers)} quantized tensors, worst {field} first.")]
        out.append(("table", ["#", "tensor", "op type", "kind", "SQNR (dB)", "local SQNR (dB)", "metric change",
                              "nodes"],
                    [[str(i + 1), _fmt(x.get("tensor")), _fmt(x.get("op_type")), _fmt(x.get("kind")),
                      _fmt(_num(x.get("sqnr_db"))), _fmt(_num(x.get("local_sqnr_db"))),
                      _fmt(_num(x.get("metric_change"))), _fmt(x.get("nodes") or [])]
                     for i, x in enumerate(ranked[:MAX_LAYER_ROWS])]))
        if len(ranked) > MAX_LAYER_ROWS:
            out.append(("p", f"{len(ranked) - MAX_LAYER_ROWS} more layers not shown."))
        image(_layers_plot(layers), f"horizontal bar chart of {field} for the worst {WORST_LAYERS} layers")
    counts = data.get("precision_by_op") or {}
    if counts:
        precisions = sorted({p for row in counts.values() for p in row})
        out += [("h2", "Precision per op type"),
                ("table", ["op type", *precisions, "total"],
                 [[op, *(str(row.get(p, 0)) for p in precisions), str(sum(row.values()))]
                  for op, row in counts.items()])]
        image(_precision_plot(counts), "stacked bar chart of node counts per op type and precision")
    search = data.get("search") or []
    if search:
        budget = data.get("budget") or {}
        out.append(("h2", "Budget search"))
        if budget:
            out.append(("p", f"budget: {budget.get('metric', metric)} limit {_fmt(_num(budget.get('limit')))}, "
                             f"reference {_fmt(_num(budget.get('reference')))}"))
        out.append(("table", ["trial", "kept float", metric, "latency (ms)", "within budget", "note"],
                    [[_fmt(t.get("trial")), _fmt(t.get("kept_float")), _fmt(_num(t.get("metric"))),
                      _fmt(_num(t.get("latency_ms"))), _fmt(bool(t.get("within_budget"))), _fmt(t.get("note", ""))]
                     for t in search]))
        image(_search_plot(data), f"line plot of {metric} per search trial with the budget line")
    for table in data.get("tables") or []:
        out += [("h2", str(table.get("title", "Table"))),
                ("table", [_fmt(c) for c in table.get("columns", [])],
                 [[_fmt(v) for v in row] for row in table.get("rows", [])])]
    if data.get("environment"):
        out += [("h2", "Environment"),
                ("table", ["key", "value"], [[k, _fmt(v)] for k, v in _flatten(data["environment"])])]
    if data.get("command"):
        out += [("h2", "Command"), ("code", str(data["command"]))]
    return out


# --- renderers -------------------------------------------------------------------------------------

def _md_cell(text: str) -> str:
    return " ".join(text.split()).replace("|", r"\|")


def render_markdown(data: dict) -> str:
    """The report as Markdown (GitHub flavour); plots are embedded as data-URL images."""
    lines: list[str] = []
    for block in _blocks(data):
        kind = block[0]
        if kind in ("h1", "h2"):
            lines.append(f"{'#' * int(kind[1])} {' '.join(block[1].split())}")
        elif kind == "p":
            lines.append(block[1])
        elif kind == "code":
            fence = "`" * max(3, 1 + max((len(run) for run in re.findall("`+", block[1])), default=0))
            lines.append(f"{fence}sh\n{block[1]}\n{fence}")
        elif kind == "img":
            alt = " ".join(block[1].split()).replace("[", "(").replace("]", ")")
            lines.append(f"![{alt}](data:image/png;base64,{block[2]})")
        else:
            _, columns, rows = block
            table = [columns, ["---"] * len(columns), *rows]
            lines.append("\n".join("| " + " | ".join(_md_cell(c) for c in row) + " |" for row in table))
        lines.append("")
    return "\n".join(lines)


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222}
h1{border-bottom:2px solid #ddd;padding-bottom:.3em}h2{margin-top:1.6em;border-bottom:1px solid #eee}
table{border-collapse:collapse;margin:.8em 0;font-size:.9em}th,td{border:1px solid #ccc;padding:.25em .6em;
text-align:left;vertical-align:top}th{background:#f3f3f3}tr:nth-child(even) td{background:#fafafa}
td.pass{color:#0a0;font-weight:bold}td.fail{color:#c00;font-weight:bold}
img{max-width:100%;height:auto;display:block;margin:.8em 0}
pre{background:#f5f5f5;padding:.8em;overflow-x:auto;white-space:pre-wrap}
""".strip()


def _html_cell(tag: str, text: str) -> str:
    css = {"PASS": ' class="pass"', "FAIL": ' class="fail"'}.get(text, "") if tag == "td" else ""
    return f"<{tag}{css}>{html.escape(text)}</{tag}>"


def render_html(data: dict) -> str:
    """The report as one self-contained HTML5 page: inline CSS, data-URL images, no scripts."""
    blocks = _blocks(data)
    body: list[str] = []
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2", "p"):
            body.append(f"<{kind}>{html.escape(block[1])}</{kind}>")
        elif kind == "code":
            body.append(f"<pre><code>{html.escape(block[1])}</code></pre>")
        elif kind == "img":
            body.append(f'<img src="data:image/png;base64,{block[2]}" alt="{html.escape(block[1])}">')
        else:
            _, columns, rows = block
            head = "".join(_html_cell("th", c) for c in columns)
            rows_html = "\n".join("<tr>" + "".join(_html_cell("td", c) for c in row) + "</tr>" for row in rows)
            body.append(f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{rows_html}\n</tbody>\n</table>")
    title = html.escape(" ".join(blocks[0][1].split()))
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{title}</title>\n<style>\n{_CSS}\n</style>\n</head>\n<body>\n" + "\n".join(body)
            + "\n</body>\n</html>\n")


def write_report(path: str | Path, data: dict) -> Path:
    """Render ``data`` by the suffix of ``path`` (.md, .html, .htm) and write it atomically."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise InputSpecError(f"unsupported report file type {path.suffix or '(none)'!r}", where=str(path),
                             fix=f"name a file ending in {', '.join(SUFFIXES)}")
    text = render_markdown(data) if suffix == ".md" else render_html(data)
    return write_text(path, text)  # a temp file beside it, then os.replace; removed on failure
