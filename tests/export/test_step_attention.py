"""The decoder step's attention: the same values as fairseq's forward, and one ONNX Runtime kernel per attention in
the graph."""
import onnx
import pytest
import torch

from export.exporter import export_graphs
from export.step_attention import step_attention
from lite.modules.attention import multihead_attention
from tests.conftest import assert_close, tiny_dictionary, tiny_model

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter


@pytest.mark.parametrize("heads,head_dim", [(4, None), (3, 5)])  # fairseq's own; pruned (H * D != C)
def test_self_attention_steps_as_fairseq(heads, head_dim):
    """5 steps on N = 3 rows from a 2-frame cache: outputs and grown caches equal fairseq's."""
    attn = multihead_attention(16, heads, head_dim, self_attention=True).eval()
    d = attn.head_dim
    cache = {"prev_key": torch.randn(3, heads, 2, d), "prev_value": torch.randn(3, heads, 2, d)}
    theirs, ours = {}, {}
    attn._set_input_buffer(theirs, dict(cache))
    attn._set_input_buffer(ours, dict(cache))
    for _ in range(5):
        x = torch.randn(1, 3, 16)  # 1 x N x C
        expected = attn(x, x, x, incremental_state=theirs, need_weights=False)[0]
        with step_attention(attn):
            actual = attn(x, x, x, incremental_state=ours, need_weights=False)[0]
        assert_close(actual, expected, atol=1e-6, rtol=1e-6)
    for key in ("prev_key", "prev_value"):
        assert attn._get_input_buffer(ours)[key].shape == (3, heads, 7, d)
        # one GEMM for the three projections may round the last bit otherwise than three
        assert_close(attn._get_input_buffer(ours)[key], attn._get_input_buffer(theirs)[key], atol=1e-6, rtol=1e-6)
    assert "forward" not in vars(attn)  # the class's forward again on leaving


@pytest.mark.parametrize("beam", [1, 2])
def test_cross_attention_on_padded_memory_as_fairseq(beam):
    """The memory once per sentence [B, ...], ``beam`` rows per sentence querying it (fairseq: kv_bsz != bsz)."""
    attn = multihead_attention(16, 4, 5, kdim=12, vdim=12, encoder_decoder_attention=True).eval()
    memory = {"prev_key": torch.randn(3, 4, 6, 5), "prev_value": torch.randn(3, 4, 6, 5),
              "prev_key_padding_mask": torch.tensor([[True, True, False, False, False, False]] + [[False] * 6] * 2)}
    x = torch.randn(1, 3 * beam, 16)
    state = {}
    attn._set_input_buffer(state, dict(memory))
    expected = attn(x, None, None, incremental_state=state, static_kv=True, need_weights=False)[0]
    with step_attention(attn):
        actual = attn(x, None, None, incremental_state=state, static_kv=True, need_weights=False)[0]
    assert_close(actual, expected, atol=1e-6, rtol=1e-6)


def test_other_calls_go_to_fairseq():
    """A full-sequence pass (no incremental state) is fairseq's own, also while patched."""
    attn = multihead_attention(16, 4, self_attention=True).eval()
    x = torch.randn(5, 2, 16)
    expected = attn(x, x, x, need_weights=True)
    with step_attention(attn):
        actual = attn(x, x, x, need_weights=True)
    assert_close(actual[0], expected[0], atol=0, rtol=0)
    assert_close(actual[1], expected[1], atol=0, rtol=0)


@pytest.mark.parametrize("arch", ["transformer_d128", "lsra_iwslt_160"])
def test_each_attention_step_is_one_onnx_runtime_kernel(arch, tmp_path):
    """fairseq's forward, traced, leaves Shape -> Gather -> Unsqueeze -> Concat chains and a dozen kernels in every
    attention; the step graph has one MultiHeadAttention per attention, beside its projections (self attention's
    three as one MatMul, split) and layout changes (the Gathers of the beam reordering are the decoder's, outside
    the attentions' scope)."""
    model = tiny_model(arch, tiny_dictionary())
    export_graphs(model, tmp_path)
    nodes = onnx.load(str(tmp_path / "decoder_step.onnx"), load_external_data=False).graph.node
    attention = [n for n in nodes if ("/attn/" in n.name or "/cross_attention/" in n.name) and "_proj/" not in n.name]
    kernels = [n for n in attention if n.op_type == "MultiHeadAttention"]
    assert len(kernels) == 2 * len(model.decoder.layers) and {n.domain for n in kernels} == {"com.microsoft"}
    assert {n.op_type for n in attention} <= {"MultiHeadAttention", "MatMul", "Add", "Split", "Reshape", "Transpose",
                                              "Constant"}
    assert sum(n.op_type == "MatMul" for n in attention) == sum(n.op_type == "Split" for n in attention) == len(kernels) // 2
    assert [n.name for n in nodes if n.domain == "lite"] == []  # every traced StepAttention rewritten
