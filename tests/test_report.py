"""qcompile.report: Pareto front, precision per op type, Markdown/HTML rendering, atomic writes, and the
HTML report in a real browser (headless Chromium)."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from io import BytesIO
from pathlib import Path

import matplotlib.image
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto as T
from onnx import helper as h

from qcompile import report
from qcompile.errors import InputSpecError

SECTIONS = ["Summary", "Gate", "Candidates", "Layers", "Precision per op type", "Budget search", "Extra numbers",
            "Environment", "Command"]
PNG = re.compile(r"data:image/png;base64,([A-Za-z0-9+/=]+)")


def full_data() -> dict:
    """Every section, with non-finite values both as floats and as strings."""
    return {
        "title": "quantize <demo> & report",
        "command": "qcompile quantize model.onnx -o out.onnx --budget 'cosine>=0.99'",
        "summary": [["verdict", "PASS"], ["metric", "cosine"], ["speedup", 1.8]],
        "gate": {"metric": "cosine", "reference": 1.0, "candidate": 0.995, "drop": "inf",
                 "checks": [{"name": "drop", "value": float("nan"), "limit": "<= 0.01", "passed": False},
                            {"name": "minimum", "value": 0.995, "limit": ">= 0.9", "passed": True}],
                 "passed": False},
        "metric_name": "cosine", "higher_is_better": True,
        "candidates": [{"name": f"cand{i}", "latency_ms": None if i == 3 else 10 - 0.7 * i,
                        "metric": 0.9 + 0.01 * (i * 7 % 10), "within_budget": [True, False, None][i % 3],
                        "chosen": i == 5} for i in range(10)],
        "layers": [{"tensor": f"/model/layers.{i}/mlp/down_proj/MatMul_output_0 $x$ |", "nodes": [f"n{i}"],
                    "op_type": "MatMul", "kind": ["activation", "weight"][i % 2],
                    "sqnr_db": float("inf") if i == 0 else 20 + 0.5 * i,
                    "local_sqnr_db": "inf" if i == 1 else 25 + i * 13 % 30, "metric_change": 1e-4 * i}
                   for i in range(60)],
        "precision_by_op": {"Add": {"fp16": 5}, "MatMul": {"fp32": 2, "int8": 30}, "Relu": {"fp32": 3}},
        "search": [{"trial": i, "kept_float": 2 * i, "metric": 0.98 + 0.002 * i, "latency_ms": 5.0 + i,
                    "within_budget": i >= 5, "note": "start" if i == 0 else ""} for i in range(8)],
        "budget": {"metric": "cosine", "limit": 0.99, "reference": 1.0},
        "environment": {"python": "3.11", "packages": {"onnx": "1.17"}, "gpu": None},
        "tables": [{"title": "Extra numbers", "columns": ["a", "b"], "rows": [[1, "x|y"], [float("inf"), None]]}],
    }


# --- pareto_front ------------------------------------------------------------------------------------

def dominated(p: tuple[float, float], q: tuple[float, float], higher: bool) -> bool:
    """Whether q dominates p (brute force, straight from the definition)."""
    better_or_equal = q[1] >= p[1] if higher else q[1] <= p[1]
    strictly = q[1] > p[1] if higher else q[1] < p[1]
    return q[0] <= p[0] and better_or_equal and (q[0] < p[0] or strictly)


values = st.one_of(st.integers(0, 4).map(float), st.floats(allow_nan=False, width=32))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.one_of(st.none(), values), values), max_size=25), st.booleans())
def test_pareto_front_matches_brute_force(points, higher):
    front = report.pareto_front(points, higher)
    valid = [i for i, p in enumerate(points) if p[0] is not None]
    expected = {i for i in valid if not any(dominated(points[i], points[j], higher) for j in valid if j != i)}
    assert set(front) == expected
    assert len(front) == len(set(front))
    latencies = [points[i][0] for i in front]
    assert latencies == sorted(latencies)


def test_pareto_front_reads_strings_and_skips_missing():
    points = [(1.0, 0.5), ("2", 0.9), (None, 1.0), (3.0, "inf"), (0.5, float("nan"))]
    assert report.pareto_front(points, True) == [0, 1, 3]
    assert report.pareto_front(points, False) == [0]
    assert report.pareto_front([], True) == []


# --- precision_by_op ---------------------------------------------------------------------------------

QDQ_MODEL = """
<ir_version: 10, opset_import: ["" : 21]>
g (float[1,4] x) => (float16[1,3] z, float[1,4] r)
<int8[4,3] w = {1,2,3,4,5,6,7,8,9,10,11,12}, float w_scale = {0.1}, int8 w_zp = {0}, float x_scale = {0.05},
 int8 x_zp = {0}, float16[3] b = {1,2,3}>
{
  xq = QuantizeLinear(x, x_scale, x_zp)
  xdq = DequantizeLinear(xq, x_scale, x_zp)
  wdq = DequantizeLinear(w, w_scale, w_zp)
  y = MatMul(xdq, wdq)
  yh = Cast<to=10>(y)
  z = Add(yh, b)
  r = Relu(x)
}
"""


def test_precision_by_op_on_a_qdq_model():
    proto = onnx.parser.parse_model(QDQ_MODEL)
    onnx.checker.check_model(proto, full_check=True)
    expected = {"Add": {"fp16": 1}, "MatMul": {"int8": 1}, "Relu": {"fp32": 1}}
    model = ir.from_proto(proto)
    assert all(v.type is None for n in model.graph for v in n.outputs if not v.is_graph_output())
    assert report.precision_by_op(model) == expected
    proto.graph.node.reverse()  # stored out of order: types still flow producer to consumer
    assert report.precision_by_op(ir.from_proto(proto)) == expected


def test_precision_by_op_formats_and_never_reads_weights(tmp_path):
    s, zu = h.make_tensor("s", T.FLOAT, [], [0.1]), h.make_tensor("zu", T.UINT8, [], [128])
    inits = [s, zu, h.make_tensor("w4", T.INT4, [2, 2], [1, 2, 3, 4]),
             h.make_tensor("w8f", T.FLOAT8E4M3FN, [2, 2], [1.0, 2.0, 3.0, 4.0]),
             h.make_tensor("packed", T.UINT8, [2, 1, 1], [1, 2]), h.make_tensor("idx", T.INT64, [], [0])]
    c16 = h.make_tensor("c16", T.FLOAT16, [2], [1.0, 2.0])
    nodes = [
        h.make_node("QuantizeLinear", ["a", "s", "zu"], ["aq"]),
        h.make_node("DequantizeLinear", ["aq", "s", "zu"], ["adq"]),
        h.make_node("DequantizeLinear", ["w4", "s"], ["w4dq"]),
        h.make_node("MatMul", ["adq", "w4dq"], ["m1"]),  # uint8 activation x int4 weight: the weight's
        h.make_node("DequantizeLinear", ["au", "s", "zu"], ["audq"]),
        h.make_node("MatMul", ["adq", "audq"], ["m2"]),  # two uint8 activations
        h.make_node("DequantizeLinear", ["w8f", "s"], ["w8dq"]),
        h.make_node("MatMul", ["a", "w8dq"], ["m3"]),  # fp8 weight
        h.make_node("MatMulNBits", ["a", "packed", "s"], ["nb4"], domain="com.microsoft", bits=4, K=2, N=2,
                    block_size=16),
        h.make_node("MatMulNBits", ["a", "packed", "s"], ["nb8"], domain="com.microsoft", bits=8, K=2, N=2,
                    block_size=16),
        h.make_node("MatMulNBits", ["a", "packed", "s"], ["nbd"], domain="com.microsoft", K=2, N=2, block_size=16),
        h.make_node("QLinearMatMul", ["aq", "s", "zu", "aq", "s", "zu", "s", "zu"], ["qm"]),
        h.make_node("MatMulInteger", ["au", "au"], ["mi"]),
        h.make_node("Relu", ["ab"], ["rb"]),
        h.make_node("Shape", ["a"], ["sh"]),
        h.make_node("Gather", ["sh", "idx"], ["g"]),
        h.make_node("Constant", [], ["k"], value=c16),
        h.make_node("Add", ["k", "k"], ["ad"]),
        h.make_node("Cast", ["ad"], ["adf"], to=T.FLOAT),
        h.make_node("Sigmoid", ["adf"], ["sg"]),
    ]
    outputs = ["m1", "m2", "m3", "nb4", "nb8", "nbd", "qm", "mi", "rb", "g", "sg"]
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("a", T.FLOAT, [2, 2]),
                                      h.make_tensor_value_info("au", T.UINT8, [2, 2]),
                                      h.make_tensor_value_info("ab", T.BFLOAT16, [2, 2])],
                         [h.make_value_info(name, onnx.TypeProto()) for name in outputs], inits)
    proto = h.make_model(graph, opset_imports=[h.make_opsetid("", 21), h.make_opsetid("com.microsoft", 1)])
    model = ir.from_proto(proto)
    # the int4 weight lives in a file that does not exist: reading its bytes would raise
    value = model.graph.initializers["w4"]
    value.const_value = ir.ExternalTensor("missing.data", 0, 2, ir.DataType.INT4, shape=ir.Shape([2, 2]),
                                          name="w4", base_dir=str(tmp_path))
    counts = report.precision_by_op(model)
    assert counts == {
        "Add": {"fp16": 1}, "Gather": {"int64": 1}, "MatMul": {"fp8": 1, "int4": 1, "uint8": 1},
        "MatMulInteger": {"int8": 1}, "MatMulNBits": {"int4": 2, "int8": 1}, "QLinearMatMul": {"int8": 1},
        "Relu": {"bf16": 1}, "Shape": {"fp32": 1}, "Sigmoid": {"fp32": 1},
    }
    assert list(counts) == sorted(counts)


# --- rendering ---------------------------------------------------------------------------------------

def decoded_pngs(text: str) -> list[np.ndarray]:
    images = [matplotlib.image.imread(BytesIO(base64.b64decode(b64)), format="png") for b64 in PNG.findall(text)]
    for image in images:
        assert image.ndim == 3 and image.shape[0] > 50 and image.shape[1] > 50 and image.shape[2] in (3, 4)
    return images


def md_headings(text: str) -> list[str]:
    return re.findall(r"^## (.+)$", text, flags=re.M)


def html_headings(text: str) -> list[str]:
    return re.findall(r"<h2>(.*?)</h2>", text)


class TagChecker(HTMLParser):
    """Collects tags, checks that every non-void element is closed in order, and records attributes."""

    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.tags: list[tuple[str, dict]] = []
        self.errors: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(f"unbalanced </{tag}>")


def test_markdown_has_every_section_in_order_and_decodable_images():
    text = report.render_markdown(full_data())
    assert text.startswith("# quantize <demo> & report\n")
    assert md_headings(text) == SECTIONS
    assert len(decoded_pngs(text)) == 4
    assert all(alt.strip() for alt in re.findall(r"!\[([^\]]*)\]\(data:image/png", text))
    assert "| x\\|y |" in text and "MatMul_output_0 $x$ \\|" in text  # pipes escaped in cells
    for line in text.splitlines():
        if line.startswith("| item") or line.startswith("| check"):
            assert len(re.findall(r"(?<!\\)\|", line)) in (3, 5)
    assert "```sh\nqcompile quantize model.onnx -o out.onnx --budget 'cosine>=0.99'\n```" in text
    assert "| drop | nan | <= 0.01 | FAIL |" in text and "| minimum | 0.995 | >= 0.9 | PASS |" in text
    assert "drop inf — FAIL" in text


def test_html_is_self_contained_escaped_and_well_formed():
    text = report.render_html(full_data())
    assert text.startswith("<!DOCTYPE html>") and '<meta charset="utf-8">' in text
    assert html_headings(text) == SECTIONS
    assert "<title>quantize &lt;demo&gt; &amp; report</title>" in text and "<demo>" not in text
    checker = TagChecker()
    checker.feed(text)
    checker.close()
    assert not checker.errors and not checker.stack
    tags = [tag for tag, _ in checker.tags]
    assert "script" not in tags and "link" not in tags and "url(" not in text
    assert not re.search(r'(src|href)="(?!data:)', text)  # nothing fetched from outside the file
    images = [attrs for tag, attrs in checker.tags if tag == "img"]
    assert len(images) == 4 and all(a["src"].startswith("data:image/png;base64,") and a["alt"] for a in images)
    assert len(decoded_pngs(text)) == 4
    assert '<td class="fail">FAIL</td>' in text and '<td class="pass">PASS</td>' in text


@pytest.mark.parametrize("render,headings", [(report.render_markdown, md_headings),
                                             (report.render_html, html_headings)])
def test_absent_sections_are_omitted(render, headings):
    assert headings(render({"title": "only a title"})) == []
    assert PNG.findall(render({"title": "t"})) == []
    data = full_data()
    partial = {"title": "t", "gate": data["gate"], "command": "qcompile gate a b"}
    assert headings(render(partial)) == ["Gate", "Command"]
    partial = {"title": "t", "search": data["search"], "precision_by_op": data["precision_by_op"]}
    text = render(partial)
    assert headings(text) == ["Precision per op type", "Budget search"]
    assert len(decoded_pngs(text)) == 2
    # candidates with no finite latency: the table, but no plot
    text = render({"title": "t", "candidates": [{"name": "a", "latency_ms": None, "metric": 1.0, "chosen": True}]})
    assert headings(text) == ["Candidates"] and PNG.findall(text) == []


def test_data_without_a_title_is_refused():
    with pytest.raises(InputSpecError, match="title"):
        report.render_markdown({"summary": [["a", 1]]})


# --- write_report ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["report.md", "report.html", "report.HTM"])
def test_write_report_by_suffix(tmp_path, name):
    path = report.write_report(tmp_path / name, full_data())
    assert path == tmp_path / name
    text = path.read_text(encoding="utf-8")
    assert text.startswith("# quantize") if name.endswith(".md") else text.startswith("<!DOCTYPE html>")
    assert sorted(os.listdir(tmp_path)) == [name]  # no temp file left beside it


def test_write_report_refuses_other_suffixes(tmp_path):
    with pytest.raises(InputSpecError) as info:
        report.write_report(tmp_path / "report.txt", full_data())
    assert info.value.exit_code == 2
    assert str(tmp_path / "report.txt") in str(info.value) and ".md" in str(info.value)
    assert ".html" in str(info.value) and ".htm" in str(info.value)
    with pytest.raises(InputSpecError):
        report.write_report(tmp_path / "report", full_data())
    assert os.listdir(tmp_path) == []


def test_write_report_leaves_nothing_on_failure(tmp_path, monkeypatch):
    with pytest.raises(InputSpecError):
        report.write_report(tmp_path / "r.md", {"no": "title"})
    (tmp_path / "r.html").write_text("old")

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        report.write_report(tmp_path / "r.html", full_data())
    assert os.listdir(tmp_path) == ["r.html"] and (tmp_path / "r.html").read_text() == "old"


# --- environment -------------------------------------------------------------------------------------

def test_environment_lists_versions_without_importing_torch(tmp_path):
    code = ("import json, sys; from qcompile.report import environment; env = environment(); "
            "assert 'torch' not in sys.modules, 'torch imported'; print(json.dumps(env))")
    # run outside the checkout: its qcompile/ would shadow the installed package
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    env = json.loads(proc.stdout)
    assert env["python"] == ".".join(map(str, sys.version_info[:3]))
    for name in ("qcompile-onnx", "onnx", "onnxruntime", "onnx-ir", "onnxscript", "numpy", "matplotlib"):
        assert env["packages"][name], name
    assert all(version for version in env["packages"].values() if version is not None)
    assert "|cores=" in env["cpu"] and env["machine"]


def test_environment_gpu_name_from_nvidia_smi(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert report.environment()["gpu"] is None
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'NVIDIA H200'\n")
    fake.chmod(0o755)
    assert report.environment()["gpu"] == "NVIDIA H200"


# --- the HTML in a real browser ----------------------------------------------------------------------

def test_html_report_renders_in_chromium(tmp_path):
    chromium = shutil.which("chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    missing = [what for what, ok in (("chromium", chromium), ("playwright", sync_playwright)) if not ok]
    if missing:
        reason = f"{' and '.join(missing)} not installed"
        if os.environ.get("QCOMPILE_REQUIRE_BROWSER") == "1":
            pytest.fail(f"{reason}, but QCOMPILE_REQUIRE_BROWSER=1")
        pytest.skip(reason)
    path = report.write_report(tmp_path / "report.html", full_data())
    errors: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"], headless=True)
        try:
            page = browser.new_page()
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(Path(path).resolve().as_uri(), wait_until="load")
            state = page.evaluate("""() => {
                const images = Array.from(document.images);
                return {count: images.length,
                        broken: images.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt),
                        headings: Array.from(document.querySelectorAll('h2')).map(h => h.textContent),
                        title: document.title, charset: document.characterSet};
            }""")
        finally:
            browser.close()
    assert state["count"] == 4
    assert state["broken"] == []
    assert state["headings"] == SECTIONS
    assert state["title"] == "quantize <demo> & report" and state["charset"] == "UTF-8"
    assert errors == []
