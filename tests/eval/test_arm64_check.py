"""The pure parts of ``make arm64-check`` (the emulated run itself is too slow for the suite): op shares from an ONNX
Runtime profile and the comparison of hypotheses. Expected numbers worked out by hand."""
import pytest

from eval.arm64_check import Arm64Error, compare, op_shares


def node(op: str, dur: int, phase: str = "kernel_time") -> dict:
    return {"cat": "Node", "name": f"/{op.lower()}_1_{phase}", "dur": dur, "args": {"op_name": op}}


def test_op_shares_count_kernel_time_of_nodes_only_largest_first():
    events = [node("MatMulInteger", 300), node("Add", 100), node("MatMulInteger", 500),
              node("Add", 999, phase="fence_before"),  # not kernel time
              {"cat": "Session", "name": "model_run", "dur": 5000, "args": {}}]
    shares = op_shares(events)
    assert shares == {"MatMulInteger": 0.8889, "Add": 0.1111}  # 800 / 900, 100 / 900
    assert list(shares) == ["MatMulInteger", "Add"]


def test_op_shares_of_a_profile_without_nodes_is_empty():
    assert op_shares([{"cat": "Session", "name": "model_loading_uri", "dur": 10, "args": {}}]) == {}


def test_compare_counts_and_shows_the_first_differences_with_line_numbers():
    sources = ["a", "b", "c", "d"]
    result = compare(sources, ["A", "B", "C", "D"], ["A", "b", "C", "d"], examples=1)
    assert (result["identical"], result["differing"]) == (2, 2)
    assert result["examples"] == [{"line": 2, "source": "b", "x86_64": "B", "arm64": "b"}]


def test_compare_refuses_lists_of_different_lengths():
    with pytest.raises(Arm64Error, match="3 sources but 3 x86 and 2 arm64"):
        compare(["a", "b", "c"], ["A", "B", "C"], ["A", "B"])
