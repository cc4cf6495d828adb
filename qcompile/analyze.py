"""Per-layer analysis of a quantized model against its float reference.

For every quantized node (qcompile/records.py), on the given feeds:

    activation SQNR   10 log10(|x|^2 / |x - DQ(Q(x))|^2), x the Q input in the quantized model's own run:
                      the noise this Q/DQ adds, whatever came before it
    weight SQNR       the same for its weight, recorded when it was lowered
    local SQNR        -10 log10(sum over its quantized inputs of 10^(-SQNR/10)): the relative noise the
                      layer itself adds; suspects are ranked by it, lowest first
    output SQNR       its output against the float twin's (the reference model's tensor of that name,
                      through the records): the error accumulated up to this layer

Then for the top-K suspects, the end metric (qcompile.evaluators) with that layer, and with its region,
kept float: its quantized inputs read the float tensors again (the Q input; the reference's weight,
where the records name an unscaled twin). A region (networkx over the graph) is the layer, the
quantized layers that read the same quantized activation (Q, K, V of one attention), and the quantized
layers it feeds with no other quantized layer between.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import networkx as nx
import numpy as np
import onnx_ir as ir

from qcompile import modelio, records
from qcompile.calibrate import tapped
from qcompile.evaluators import Metric, ReferenceRun, evaluate_task
from qcompile.metrics import OutputComparison


@dataclass
class Layer:
    node: str
    op_type: str
    activations: list[str]
    weights: list[str]
    activation_sqnr_db: float | None = None
    weight_sqnr_db: float | None = None
    local_sqnr_db: float = math.inf
    output_sqnr_db: float | None = None
    macs: int = 0
    region: list[str] = field(default_factory=list)
    metric_float: float | None = None  # the end metric with this layer float
    metric_change: float | None = None  # its drop minus the quantized model's (negative: float helps)
    region_metric_change: float | None = None
    note: str = ""

    def to_json(self) -> dict:
        return asdict(self)


def noise_db(sqnrs: list[float]) -> float:
    """-10 log10(sum 10^(-s/10)): independent noises add in power."""
    total = sum(10.0 ** (-s / 10.0) for s in sqnrs if s is not None and not math.isinf(s))
    return math.inf if total == 0 else -10.0 * math.log10(total)


def measure_layers(quantized_path: str | Path, reference_path: str | Path | None, feeds: list[dict]) -> list[Layer]:
    """Every quantized layer's SQNRs (module docstring) on ``feeds``, ranked by local SQNR."""
    model = modelio.load(quantized_path)
    rec = records.read(model, str(quantized_path))
    layers = [Layer(n["node"], n["op_type"], n["activations"], n["weights"]) for n in rec["nodes"]]
    act_dq = {a["tensor"]: a["dq"] for a in rec["activations"]}
    outputs = {n["node"]: n["output"] for n in rec["nodes"]}
    taps = list(dict.fromkeys([*act_dq, *act_dq.values(), *outputs.values()]))
    act_cmp = {name: OutputComparison(name) for name in act_dq}
    out_cmp = {name: OutputComparison(name) for name in outputs}
    shapes: dict[str, tuple] = {}
    twins: dict[str, str] = {}
    ref_model = None
    if reference_path is not None:
        ref_model = modelio.load(reference_path)
        ref_names = {v.name for node in ref_model.graph for v in node.outputs}
        twins = {node: out for node, out in outputs.items() if out in ref_names}
    ref_runtime = None
    with tapped(model, taps) as runtime:
        if twins:
            ref_ctx = tapped(ref_model, list(dict.fromkeys(twins.values())))
            ref_runtime = ref_ctx.__enter__()
        try:
            for feed in feeds:
                got = runtime.run(feed)
                for name, dq in act_dq.items():
                    act_cmp[name].add(got[name], got[dq])
                    shapes[name] = np.shape(got[name])
                for node, out in outputs.items():
                    shapes[out] = np.shape(got[out])
                if ref_runtime is not None:
                    want = ref_runtime.run(feed)
                    for node, out in twins.items():
                        out_cmp[node].add(want[out], got[out])
        finally:
            if ref_runtime is not None:
                ref_ctx.__exit__(None, None, None)
    weight_db = {w["tensor"]: _float(w["sqnr_db"]) for w in rec["weights"]}
    weight_shape = _weight_shapes(model, {w["tensor"]: w["dq"] for w in rec["weights"]})
    for layer in layers:
        acts = [act_cmp[a].sqnr_db for a in layer.activations]
        ws = [weight_db.get(w) for w in layer.weights]
        layer.activation_sqnr_db = min(acts) if acts else None
        layer.weight_sqnr_db = min((w for w in ws if w is not None), default=None)
        layer.local_sqnr_db = noise_db([*acts, *ws])
        layer.output_sqnr_db = out_cmp[layer.node].sqnr_db if layer.node in twins else None
        layer.macs = _macs(layer, shapes.get(outputs[layer.node]), [shapes.get(a) for a in layer.activations],
                           [weight_shape.get(w) for w in layer.weights])
    for layer, region in zip(layers, regions(model, rec)):
        layer.region = region
    layers.sort(key=lambda layer: (layer.local_sqnr_db, layer.node))
    return layers


def _float(x) -> float | None:
    return None if x is None else float(x)


def _weight_shapes(model: ir.Model, weight_dq: dict[str, str]) -> dict[str, tuple]:
    producers = {n.outputs[0].name: n for n in model.graph if n.outputs}
    shapes = {}
    for name, dq in weight_dq.items():
        node = producers.get(dq)
        if node is not None and node.inputs[0] is not None and node.inputs[0].const_value is not None:
            shapes[name] = tuple(node.inputs[0].const_value.shape.numpy())
    return shapes


def _macs(layer: Layer, out: tuple | None, acts: list, weights: list) -> int:
    """Multiply-adds: output elements x the reduction length (MatMul/Gemm: the input's last dim;
    Conv: the weight's elements per output channel)."""
    if not out:
        return 0
    elements = int(np.prod(out))
    if layer.op_type.startswith("Conv") and weights and weights[0]:
        w = weights[0]
        return elements * int(np.prod(w)) // max(w[0] if layer.op_type == "Conv" else w[1], 1)
    if acts and acts[0]:
        return elements * int(acts[0][-1])
    if weights and weights[0]:
        return elements * int(weights[0][0])
    return elements


def regions(model: ir.Model, rec: dict) -> list[list[str]]:
    """Per recorded node (in record order), its region (module docstring)."""
    quantized = [n["node"] for n in rec["nodes"]]
    qset = set(quantized)
    graph = nx.DiGraph()
    for node in model.graph:
        for value in node.outputs:
            for user, _ in value.uses():
                graph.add_edge(node.name, user.name)
    readers: dict[str, set[str]] = {}
    for n in rec["nodes"]:
        for a in n["activations"]:
            readers.setdefault(a, set()).add(n["node"])
    result = []
    for n in rec["nodes"]:
        region = {n["node"]}
        for a in n["activations"]:
            region |= readers[a]
        if n["node"] in graph:  # the quantized layers reached without passing another
            frontier, seen = [n["node"]], {n["node"]}
            while frontier:
                current = frontier.pop()
                for succ in graph.successors(current):
                    if succ in seen:
                        continue
                    seen.add(succ)
                    if succ in qset:
                        region.add(succ)
                    else:
                        frontier.append(succ)
        result.append([q for q in quantized if q in region])
    return result


def keep_float(quantized_path: str | Path, nodes: set[str], reference: ir.Model | None) -> tuple[ir.Model, list[str]]:
    """The quantized model with ``nodes`` reading float inputs again (module docstring); notes
    where a weight has no float twin and stays quantized."""
    model = modelio.load(quantized_path)
    rec = records.read(model, str(quantized_path))
    producers = {v.name: node for node in model.graph for v in node.outputs}
    act_dq = {a["dq"]: a for a in rec["activations"]}
    weight_dq = {w["dq"]: w for w in rec["weights"]}
    ref_inits = reference.graph.initializers if reference is not None else {}
    added: dict[str, ir.Value] = {}
    notes = []
    for node in model.graph:
        if node.name not in nodes:
            continue
        for index, value in enumerate(node.inputs):
            if value is None:
                continue
            if value.name in act_dq:
                quant = producers[value.name].inputs[0].producer()
                node.replace_input_with(index, quant.inputs[0])
            elif value.name in weight_dq:
                w = weight_dq[value.name]
                twin = ref_inits.get(w["tensor"]) if not w["scaled"] else None
                if twin is None or twin.const_value is None:
                    notes.append(f"{node.name}: weight {w['tensor']} stays quantized (no float twin"
                                 f"{': smoothed' if w['scaled'] else ''})")
                    continue
                if w["tensor"] not in added:
                    added[w["tensor"]] = ir.Value(name=f"{w['tensor']}_float", const_value=twin.const_value,
                                                  type=twin.type, shape=twin.shape)
                    model.graph.register_initializer(added[w["tensor"]])
                node.replace_input_with(index, added[w["tensor"]])
    from qcompile.passes import make_pass
    from qcompile.passmanager import PassManager

    model = PassManager([make_pass("dead-code")])(model).model
    return model, notes


@dataclass
class Analysis:
    layers: list[Layer]
    metric: Metric | None = None
    reference_value: float | None = None
    quantized_value: float | None = None
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"metric": self.metric.to_json() if self.metric else None, "reference": self.reference_value,
                "quantized": self.quantized_value, "layers": [layer.to_json() for layer in self.layers],
                "notes": list(self.notes)}


def analyze(reference_path: str | Path, quantized_path: str | Path, feeds: list[dict], metric: Metric | None,
            top: int = 5, target: str = "ort-cpu", executor=None) -> Analysis:
    """Measure every layer, then (with ``metric``) the end metric with each top-``top`` suspect and
    its region kept float, evaluated through ``executor`` (qcompile/executor.py)."""
    from qcompile.executor import InProcess

    executor = executor or InProcess()
    layers = measure_layers(quantized_path, reference_path, feeds)
    result = Analysis(layers, metric)
    if metric is None or top <= 0:
        return result
    reference = ReferenceRun(metric, reference_path, feeds, target)
    ref_model = modelio.load(reference_path)
    suspects = layers[:top]
    with tempfile.TemporaryDirectory(prefix="qcompile-analyze-") as tmp:
        paths = [str(quantized_path)]
        for i, layer in enumerate(suspects):
            for kind, nodes in (("layer", {layer.node}), ("region", set(layer.region))):
                model, notes = keep_float(quantized_path, nodes, ref_model)
                path = Path(tmp) / f"{i}-{kind}.onnx"
                modelio.save(model, path)
                paths.append(str(path))
                if kind == "layer":
                    layer.note = "; ".join(notes)
        evaluations = executor.map(evaluate_task, [(p, 0) for p in paths], shared=reference)
    base = evaluations[0]["score"]
    result.reference_value, result.quantized_value = base["reference"], base["candidate"]
    for i, layer in enumerate(suspects):
        alone, region = evaluations[1 + 2 * i]["score"], evaluations[2 + 2 * i]["score"]
        layer.metric_float = alone["candidate"]
        layer.metric_change = _change(alone["drop"], base["drop"])
        layer.region_metric_change = _change(region["drop"], base["drop"])
    return result


def _change(drop: float | None, base: float | None) -> float | None:
    return None if drop is None or base is None else drop - base
