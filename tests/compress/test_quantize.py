"""int8 of an exported model dir: exact int8 values and scales on a hand-made tensor, every exported architecture's
graphs quantized and run beside fp32, every constant-weight MatMul quantized, an SQNR floor per quantized MatMul, the
quantized dir translating in the unchanged runtime, and the refusals (mismatched calibration text, an
already-quantized dir, an existing --out)."""
import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compress.calibration import CalibrationData
from compress.quantize import QuantizeConfig, QuantizeError, quantize, quantize_graph, sqnr_per_matmul
from export.runtime import Translator
from export.search import SearchOptions
from export.validate import onnx_runner, validate
from lite.cli import main
from lite.files import OutputError
from lite.text import read_lines
from tests.export.test_export import EXPORTED
from tests.export.test_export import _export_tiny as export_tiny

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter

SQNR_FLOOR = 20.0  # dB, per quantized MatMul (torchao's floor)

# ---------------------------------------------------------------------------------------------- hand-made tensor

# W [K=3, N=2]: per-channel = one scale per column (output channel); symmetric int8, zero point 0.
W = np.array([[0.5, -2.0], [-1.27, 0.9], [0.254, 0.3]], dtype=np.float32)
# computed by hand: scale = max|column| / 127 (range [-127, 127]); q = round(w / scale)
#   column 0: 1.27 / 127 = 0.01 -> 0.5 / 0.01 = 50, -127, 25.4 -> 25
#   column 1: 2.0 / 127        -> -127, 0.9 * 63.5 = 57.15 -> 57, 0.3 * 63.5 = 19.05 -> 19
FULL = ([0.01, 2.0 / 127], [[50, -127], [-127, 57], [25, 19]])
# reduce_range (avx2): range [-64, 64], scale = max|column| / 64
#   column 0: 1.27 / 64 = 0.01984375 -> 0.5 / s = 25.197 -> 25, -64, 0.254 / s = 12.8 -> 13
#   column 1: 2.0 / 64 = 0.03125     -> -64, 0.9 / s = 28.8 -> 29, 0.3 / s = 9.6 -> 10
REDUCED = ([1.27 / 64, 2.0 / 64], [[25, -64], [-64, 29], [13, 10]])


def _one_matmul(path):
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "one_matmul",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2])],
                              [numpy_helper.from_array(W, "W")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


@pytest.mark.parametrize("preset, expected", [("avx512_vnni", FULL), ("arm64", FULL), ("avx2", REDUCED)])
def test_int8_values_and_scales_on_a_hand_made_tensor(preset, expected, tmp_path):
    _one_matmul(tmp_path / "fp32.onnx")
    quantize_graph(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", QuantizeConfig("ort-dynamic", preset))
    model = onnx.load(str(tmp_path / "int8.onnx"))
    weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    (node,) = [n for n in model.graph.node if n.op_type == "MatMulInteger"]
    assert node.input[1] == "W_quantized" and node.input[3] == "W_zero_point"
    scales, values = expected
    assert weights["W_quantized"].dtype == np.int8
    np.testing.assert_array_equal(weights["W_quantized"], np.array(values, dtype=np.int8))
    np.testing.assert_allclose(weights["W_scale"], np.array(scales, dtype=np.float32), rtol=1e-6)
    np.testing.assert_array_equal(weights["W_zero_point"], np.zeros(2, dtype=np.int8))
    assert "W" not in weights  # the fp32 weight is gone


def _sqnr_db(reference: np.ndarray, actual: np.ndarray) -> float:
    noise = float(np.sum((reference.astype(np.float64) - actual) ** 2))
    return 10 * np.log10(float(np.sum(reference.astype(np.float64) ** 2)) / max(noise, 1e-30))


# constant stacks of matrices (B of rank 3) in each graph of a tiny model: routing's centroids, against a layer's
# queries and against its keys; every other exported architecture has none
STACKS = {"routing_100m": 2}
# whole outputs of a model that makes a discrete choice from int8 projections (routing's cluster, the Reformer's hash
# bucket) move more than a MatMul's: a flipped choice sends a frame to other keys (tiny models: 9.9-17.9 dB; 32-50
# for the rest); a graph that computes wrong gives 0 dB or less
DISCRETE, DISCRETE_FLOOR = {"routing_100m", "reformer_100m"}, 5.0


@pytest.mark.parametrize("arch", EXPORTED)
def test_every_exported_architecture_quantizes_and_its_int8_graphs_run(arch, tmp_path):
    """Every 2-D constant weight becomes int8; a constant stack of matrices stays fp32 (ONNX Runtime's int8 MatMul
    takes one matrix and fails at run time on a stack); both int8 graphs then run through the export validation's
    cases and steps (the fp32 graphs answer the validation, the int8 ones are compared with them)."""
    reference, specs, outputs = export_tiny(arch, tmp_path)
    sqnr = {"encoder": [], "decoder_step": []}

    def paired(graph):
        fp32, int8 = onnx_runner(tmp_path / f"{graph}.onnx"), onnx_runner(tmp_path / f"{graph}.int8.onnx")

        def run(feeds):
            expected, actual = fp32(feeds), int8(feeds)
            first = 1 if graph == "encoder" else 0  # the memory of layer 0 / the log-probabilities
            sqnr[graph].append(_sqnr_db(expected[first], actual[first]))
            return expected
        return run

    for graph in ("encoder", "decoder_step"):
        fp32 = onnx.load(str(tmp_path / f"{graph}.onnx"))
        ranks = {i.name: len(i.dims) for i in fp32.graph.initializer}
        stacks = [n.name for n in fp32.graph.node if n.op_type == "MatMul" and ranks.get(n.input[1]) == 3]
        matrices = [n.name for n in fp32.graph.node if n.op_type in ("MatMul", "Gemm") and ranks.get(n.input[1]) == 2]
        assert len(stacks) == STACKS.get(arch, 0) and matrices
        quantize_graph(tmp_path / f"{graph}.onnx", tmp_path / f"{graph}.int8.onnx")
        nodes = {n.name: n.op_type for n in onnx.load(str(tmp_path / f"{graph}.int8.onnx")).graph.node}
        assert all(nodes[name] == "MatMul" for name in stacks)
        assert sum(op == "MatMulInteger" for op in nodes.values()) == len(matrices)
    validate(reference, specs, paired("encoder"), paired("decoder_step"), outputs)
    print(f"SQNR int8 {arch}: " + ", ".join(f"{g} {min(v):.1f} dB over {len(v)} runs" for g, v in sqnr.items()))
    assert len(sqnr["encoder"]) == 6 and len(sqnr["decoder_step"]) == 60
    floor = DISCRETE_FLOOR if arch in DISCRETE else SQNR_FLOOR
    assert min(sqnr["encoder"]) >= floor and min(sqnr["decoder_step"]) >= floor


# ---------------------------------------------------------------------------------------------- a model dir


@pytest.fixture(scope="module")
def fp32(trained, tmp_path_factory):
    """The tiny trained LSRA of conftest (``trained``, on conftest's ``workdir`` data) exported with ORT-format
    graphs."""
    from export.exporter import export

    root = tmp_path_factory.mktemp("quantize")
    checkpoint = root / "model.pt"
    shutil.copy(trained, checkpoint)
    return export(checkpoint, root / "fp32", ort=True)


@pytest.fixture(scope="module")
def dynamic(fp32):
    return quantize(fp32, fp32.parent / "dynamic")


@pytest.fixture(scope="module")
def static(fp32):
    return quantize(fp32, fp32.parent / "static", method="ort-static")  # lines from <data>/raw/train.de


def _lines(workdir, split, count):
    return read_lines(workdir / "data" / "raw" / f"{split}.de", count)


def _count_fp32_constant_matmuls(path):
    model = onnx.load(str(path))
    weights = {i.name for i in model.graph.initializer}
    return sum(n.op_type == "MatMul" and n.input[1] in weights for n in model.graph.node)


@pytest.mark.parametrize("method", ["dynamic", "static"])
def test_every_constant_weight_matmul_is_quantized(method, fp32, request):
    out = request.getfixturevalue(method)
    entry = json.loads((out / "model.json").read_text())["quantization"]
    for graph in ("encoder", "decoder_step"):
        expected = _count_fp32_constant_matmuls(fp32 / f"{graph}.onnx")
        model = onnx.load(str(out / f"{graph}.onnx"))
        producers = {o: n for n in model.graph.node for o in n.output}
        weights = {i.name for i in model.graph.initializer}
        if method == "dynamic":
            quantized = sum(n.op_type == "MatMulInteger" for n in model.graph.node)
        else:  # QDQ: the MatMul's B is DequantizeLinear(int8 initializer)
            quantized = sum(n.op_type == "MatMul" and producers.get(n.input[1]) is not None
                            and producers[n.input[1]].op_type == "DequantizeLinear"
                            and producers[n.input[1]].input[0] in weights for n in model.graph.node)
        assert expected > 0 and quantized == expected, (graph, quantized, expected)
        assert entry["quantized"][graph]["MatMul"] == expected
        # attention stays fp32: activation x activation MatMuls in the encoder, MultiHeadAttention kernels in the step
        if graph == "encoder":
            assert sum(n.op_type == "MatMul" and n.input[1] not in weights
                       and getattr(producers.get(n.input[1]), "op_type", None) != "DequantizeLinear"
                       for n in model.graph.node) > 0
        else:
            assert sum(n.op_type == "MultiHeadAttention" for n in model.graph.node) > 0


@pytest.mark.parametrize("method", ["dynamic", "static"])
def test_sqnr_per_quantized_matmul(method, fp32, workdir, request):
    out = request.getfixturevalue(method)
    data = CalibrationData(fp32, _lines(workdir, "test", 32))  # not the calibration lines
    for graph in ("encoder", "decoder_step"):
        sqnr = sqnr_per_matmul(fp32 / f"{graph}.onnx", out / f"{graph}.onnx", data.feeds(graph))
        assert len(sqnr) == _count_fp32_constant_matmuls(fp32 / f"{graph}.onnx")
        worst = min(sqnr, key=sqnr.get)
        print(f"SQNR {method} {graph}: {min(sqnr.values()):.1f} .. {max(sqnr.values()):.1f} dB over {len(sqnr)} "
              f"MatMuls (worst {worst})")
        assert sqnr[worst] >= SQNR_FLOOR, (worst, sqnr[worst])


@pytest.mark.parametrize("method", ["dynamic", "static"])
def test_quantized_dir_translates_in_the_runtime(method, workdir, request):
    out = request.getfixturevalue(method)
    description = json.loads((out / "model.json").read_text())
    entry = description["quantization"]
    assert entry["method"] == f"ort-{method}" and entry["preset"] == "avx2" and entry["per_channel"]
    size = entry["bytes"]
    print(f"bytes {method}: " + ", ".join(f"{g} {s['before']:,} -> {s['after']:,}" for g, s in size.items()))
    assert size["total"]["after"] < size["total"]["before"]
    assert set(description["files"]) >= {"encoder.onnx", "decoder_step.onnx", "spm.model", "vocab.txt"}
    assert any(name.startswith("ort/") for name in description["files"])  # remade from the int8 graphs
    lines = [*_lines(workdir, "test", 5), "", "Ein Hund läuft."]
    for format in ("onnx", "ort"):
        outputs = Translator(out, SearchOptions(beam=2), format=format).translate(lines)
        assert len(outputs) == len(lines) and outputs[5] == ""
        assert all(outputs[i] for i in (0, 1, 2, 3, 4, 6))


def test_static_calibration_reads_the_training_text(static, workdir):
    entry = json.loads((static / "model.json").read_text())["quantization"]
    assert entry["calibration"]["source"] == str(workdir / "data" / "raw" / "train.de")
    assert entry["calibration"]["lines"] > 100 and entry["calibration"]["unk_fraction"] < 0.05


def test_mismatched_calibration_text_is_refused(fp32, tmp_path):
    greek = ["αβγδ εζηθ ικλμ νξοπ"] * 20
    with pytest.raises(QuantizeError, match=r"100% of the .* pieces .* are unknown to .*vocab.txt.*train.de"):
        quantize(fp32, tmp_path / "out", method="ort-static", calibration_lines=greek)
    assert not (tmp_path / "out").exists()


def test_an_already_quantized_dir_is_refused(dynamic, tmp_path):
    with pytest.raises(QuantizeError, match="has a 'quantization' entry.*already quantized"):
        quantize(dynamic, tmp_path / "again")
    unmarked = tmp_path / "unmarked"  # no entry in model.json, but the graphs hold int8 ops
    shutil.copytree(dynamic, unmarked)
    description = json.loads((unmarked / "model.json").read_text())
    del description["quantization"]
    (unmarked / "model.json").write_text(json.dumps(description))
    with pytest.raises(QuantizeError, match="encoder.onnx holds .*MatMulInteger.*already quantized"):
        quantize(unmarked, tmp_path / "again")


def test_existing_out_dir_needs_force(fp32, dynamic, tmp_path):
    with pytest.raises(OutputError, match="--force"):
        quantize(fp32, dynamic)
    with pytest.raises(QuantizeError, match="is the model dir itself"):
        quantize(fp32, fp32, force=True)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "a.txt").write_text("x")
    with pytest.raises(OutputError, match="not a model dir"):
        quantize(fp32, notes, force=True)
    replaced = quantize(fp32, tmp_path / "q", preset="arm64")
    assert quantize(fp32, replaced, preset="avx512_vnni", force=True) == replaced
    assert json.loads((replaced / "model.json").read_text())["quantization"]["preset"] == "avx512_vnni"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes", "q"]  # no staging dir left behind


def test_options_are_checked_all_at_once():
    with pytest.raises(QuantizeError, match="method 'int4'.*; preset 'tpu'"):
        QuantizeConfig("int4", "tpu")


def test_cli(fp32, capsys, tmp_path):
    assert main(["compress", "quantize", str(fp32), "--out", str(tmp_path / "q"), "--preset", "avx512_vnni"]) == 0
    assert "int8 MatMul/Gemm: encoder" in capsys.readouterr().out
    assert main(["compress", "quantize", str(fp32), "--out", str(tmp_path / "q")]) == 2
    assert capsys.readouterr().err.startswith("lite compress quantize: error: ")


# ---------------------------------------------------------------------------------------------- the compact layout

@pytest.fixture(scope="module")
def plain(fp32):
    return quantize(fp32, fp32.parent / "plain", compact=False)


def _initializers(path, external):
    model = onnx.load(str(path), load_external_data=external)
    return model, {i.name: i for i in model.graph.initializer}


def _projection(model, initializers):
    """The output projection's int8 weight [C, V] and its scales: the MatMulInteger over the vocabulary."""
    node = next(n for n in model.graph.node if n.op_type == "MatMulInteger" and "output_projection" in n.name)
    producers = {o: n for n in model.graph.node for o in n.output}
    weight = node.input[1]
    if weight in producers:  # compact: Transpose(int8 table)
        weight = producers[weight].input[0]
        return numpy_helper.to_array(initializers[weight]).T, weight
    return numpy_helper.to_array(initializers[weight]), weight


def test_compact_dir_stores_each_weight_once(dynamic, plain):
    from compress.compact import EXTERNAL_BYTES, WEIGHTS

    entry = json.loads((dynamic / "model.json").read_text())["quantization"]
    offsets = {}
    for graph in ("encoder", "decoder_step"):
        model, initializers = _initializers(dynamic / f"{graph}.onnx", external=False)
        inline = [i.name for i in initializers.values()
                  if i.data_location != TensorProto.EXTERNAL and len(i.raw_data) >= EXTERNAL_BYTES]
        big_constants = [n.name for n in model.graph.node if n.op_type == "Constant"
                         and len(n.attribute[0].t.raw_data) >= EXTERNAL_BYTES]
        assert not inline and not big_constants, (graph, inline, big_constants)
        for i in initializers.values():
            if i.data_location == TensorProto.EXTERNAL:
                where = {e.key: e.value for e in i.external_data}
                assert where["location"] == WEIGHTS
                offsets.setdefault(i.name, set()).add(where["offset"])
    shared = [name for name, o in offsets.items() if name.startswith("compact.embedding")]
    assert shared and all(len(offsets[name]) == 1 for name in shared)  # the table: one place, both graphs
    assert entry["compact"]["computed_position_tables"] == 2  # encoder and decoder: no table left
    # the size figures against an independent count of the bytes on disk
    on_disk = {name: (dynamic / name).stat().st_size for name in ("encoder.onnx", "decoder_step.onnx", WEIGHTS)}
    assert entry["compact"]["bytes"] == on_disk[WEIGHTS]
    assert entry["bytes"]["total"]["after"] == sum(on_disk.values())
    dir_bytes = {d: sum(p.stat().st_size for p in d.rglob("*") if p.is_file()) for d in (dynamic, plain)}
    print(f"int8 dir bytes: compact {dir_bytes[dynamic]:,}, --no-compact {dir_bytes[plain]:,}")
    assert dir_bytes[dynamic] < dir_bytes[plain]


def test_compact_tables_reconstruct_the_int8_weights_exactly(dynamic, plain, fp32):
    """The lookup table is the --no-compact output projection's int8 weight, transposed, bit for bit, and both are
    ONNX Runtime's per-channel int8 of the fp32 table (``per_row_int8``)."""
    from compress.compact import per_row_int8

    compact_model, compact_init = _initializers(dynamic / "decoder_step.onnx", external=True)
    plain_model, plain_init = _initializers(plain / "decoder_step.onnx", external=True)
    table_q, table = _projection(compact_model, compact_init)
    plain_q, plain_weight = _projection(plain_model, plain_init)
    scale = numpy_helper.to_array(compact_init[table.removesuffix(".int8") + ".scale"])
    plain_scale = numpy_helper.to_array(plain_init[plain_weight.removesuffix("_quantized") + "_scale"])
    np.testing.assert_array_equal(table_q, plain_q)
    np.testing.assert_array_equal(scale, plain_scale)
    fp32_model, fp32_init = _initializers(fp32 / "decoder_step.onnx", external=True)
    gather = next(n for n in fp32_model.graph.node if n.op_type == "Gather" and n.input[0] in fp32_init)
    q, s = per_row_int8(numpy_helper.to_array(fp32_init[gather.input[0]]), reduce_range=True)  # the avx2 preset
    np.testing.assert_array_equal(q.T, table_q)
    np.testing.assert_allclose(s, scale, rtol=1e-6)


def test_sinusoidal_positions_are_fairseqs():
    from fairseq.modules import SinusoidalPositionalEmbedding

    from compress.compact import sinusoidal_table

    expected = SinusoidalPositionalEmbedding.get_embedding(300, 32, padding_idx=1).numpy()
    np.testing.assert_allclose(sinusoidal_table(300, 32, 1), expected, atol=2e-5)


def test_compact_layout_is_validated_against_fp32(dynamic, plain, workdir):
    validation = json.loads((dynamic / "model.json").read_text())["quantization"]["compact"]["validation"]
    sqnr = validation["sqnr_db"]
    print(f"SQNR vs fp32 (dB), {validation['lines']} valid lines: {sqnr}")
    for graph in ("encoder", "decoder_step"):  # the int8 embedding's cost on this tiny model, measured: encoder
        # < 1 dB below the no-compact layout on an AVX2 CPU, 1.2 dB on an AVX512-VNNI one (other int8 kernels)
        assert sqnr["no_compact"][graph] - 2.0 <= sqnr["compact"][graph] < float("inf")
    lines = _lines(workdir, "test", 40)
    compact, no_compact = (Translator(d, SearchOptions(beam=2)).translate(lines) for d in (dynamic, plain))
    assert sum(a == b for a, b in zip(compact, no_compact)) >= 0.8 * len(lines)


def _two_outputs(path, small_gain):
    """A graph of outputs ``large = 1000 x`` and ``small = small_gain * x``."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3]) for n in ("large", "small")]
    gains = [numpy_helper.from_array(np.array(g, np.float32), f"{n}_gain")
             for n, g in (("large", 1000), ("small", small_gain))]
    nodes = [helper.make_node("Mul", ["x", f"{n}_gain"], [n]) for n in ("large", "small")]
    onnx.save(helper.make_model(helper.make_graph(nodes, "two", [x], outputs, gains)), str(path))
    return path


def test_compact_validation_reports_the_worst_output_not_the_largest(tmp_path):
    from compress.compact import validate

    exact, noisy = _two_outputs(tmp_path / "exact.onnx", 1.0), _two_outputs(tmp_path / "noisy.onnx", 1.1)
    x = np.array([[1, -2, 3], [0.5, -np.inf, 4]], np.float32)  # a masked log-prob: -inf in both, left out
    graphs = ("encoder", "decoder_step")
    report = validate({g: exact for g in graphs}, {"int8": {g: noisy for g in graphs}}, {g: [{"x": x}] for g in graphs})
    for g in graphs:  # small: noise 0.1 x -> 20 dB; summed with large's exact 1000 x it would read 80 dB
        assert report["int8"][g] == pytest.approx(20.0, abs=0.01)


@pytest.mark.parametrize("damage", ["truncated", "missing", "swapped"])
def test_a_damaged_weights_file_is_refused(dynamic, tmp_path, damage):
    from export.model_dir import ModelDirError

    broken = tmp_path / "broken"
    shutil.copytree(dynamic, broken)
    weights = broken / "weights.bin"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif damage == "missing":
        weights.unlink()
    else:  # one byte of the shared table changed: same size, other values
        data = bytearray(weights.read_bytes())
        data[64] ^= 0x7F
        weights.write_bytes(bytes(data))
    with pytest.raises(ModelDirError, match="weights.bin (is missing|does not match its sha256)"):
        Translator(broken)


def test_only_row_lookups_are_compacted_as_embeddings():
    """A Gather of a 2-D table along axis 1 (the Synthesizer's columns by position) keeps its fp32 table: the per-row
    int8 layout would look its scales up by column (it failed as "idx=4 must be within [-4,3]" on a 4-row table)."""
    from compress.compact import _embedding_gathers, _Graph

    table = numpy_helper.from_array(np.ones((4, 8), dtype=np.float32), "table")  # [rows, columns]
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, [3])
    nodes = [helper.make_node("Gather", ["table", "ids"], ["by_row"], name="row"),
             helper.make_node("Gather", ["table", "ids"], ["by_row_0"], name="row_0", axis=0),
             helper.make_node("Gather", ["table", "ids"], ["by_column"], name="column", axis=1)]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("by_row", "by_row_0", "by_column")]
    model = helper.make_model(helper.make_graph(nodes, "g", [ids], outputs, [table]))
    assert [n.name for n in _embedding_gathers(_Graph(model))] == ["row", "row_0"]
