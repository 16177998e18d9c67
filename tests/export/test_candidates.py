"""The step graph's candidates alone: penalties + per-row top-k in ONNX Runtime equal the search's numpy
(``penalize`` + ``top_candidates``) to the bit, NaN rows included."""
import numpy as np
import pytest

from export.candidates import add_candidates
from export.search import SearchOptions, penalize, top_candidates

PAD, EOS, UNK, V = 1, 2, 3, 12


@pytest.fixture(scope="module")
def session():
    """A graph whose ``log_probs`` are its input, with the candidates appended as the exporter appends them."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["log_probs"])], "candidates",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", V]),
         helper.make_tensor_value_info("step", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("log_probs", TensorProto.FLOAT, ["batch", V])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    add_candidates(model, pad=PAD, eos=EOS, unk=UNK)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        shifted = logits - logits.max(axis=1, keepdims=True)
        return (shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))).astype(np.float32)


@pytest.mark.parametrize("step", [0, 2, 5, 6, 9])  # before min_len, between, at and past max_len
@pytest.mark.parametrize("unk_penalty", [0.0, 0.75])
def test_graph_candidates_equal_the_search_penalties_and_top_k(session, step, unk_penalty):
    rng = np.random.default_rng(step)
    logits = rng.normal(size=(5, V)).astype(np.float32)
    logits[1, 4] = np.nan  # LogSoftmax spreads it over the row
    logits[2, 7] = np.inf
    logits[3, 5:] = logits[3, 0]  # ties: lower index first
    lprobs = _log_softmax(logits)
    assert np.isnan(lprobs[1]).all() and np.isnan(lprobs[2]).all()
    options = SearchOptions(min_len=3, unk_penalty=unk_penalty)
    for k in (1, 4, 8):
        scores, tokens = session.run(["cand_scores", "cand_tokens"], {
            "x": lprobs, "step": np.array(step, dtype=np.int64), "min_len": np.array(3, dtype=np.int64),
            "max_len": np.array(6, dtype=np.int64), "unk_penalty": np.array(unk_penalty, dtype=np.float32),
            "k": np.array([k], dtype=np.int64)})
        expected = lprobs.copy()
        penalize(expected, step, 6, options, eos=EOS, pad=PAD, unk=UNK)
        expected_scores, expected_tokens = top_candidates(expected, k)
        np.testing.assert_array_equal(scores, expected_scores)
        np.testing.assert_array_equal(tokens, expected_tokens)
