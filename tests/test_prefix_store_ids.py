import pytest

from prefix_store.errors import InvalidPrefix, InvalidTaskId
from prefix_store.fingerprint import ModelFingerprint
from prefix_store.ids import validate_task_id, validate_tenant

BAD_IDS = ["../x", "", "a/b", "a" * 129, ".", "..", "a..b", ".hidden", "-x", "x\n", "a b", "ü", None, 5]


@pytest.mark.parametrize("bad", BAD_IDS)
def test_bad_ids_are_rejected(bad: object) -> None:
    with pytest.raises(InvalidTaskId):
        validate_task_id(bad)
    with pytest.raises(InvalidTaskId):
        validate_tenant(bad)


def test_a_long_id_is_quoted_cut_short() -> None:
    with pytest.raises(InvalidTaskId) as info:
        validate_task_id("x" * 100_000)
    assert "(100000 characters)" in str(info.value) and len(str(info.value)) < 300


@pytest.mark.parametrize("good", ["a", "summarize", "Task_1.v2-final", "9", "a" * 128])
def test_good_ids_pass_unchanged(good: str) -> None:
    assert validate_task_id(good) == good
    assert validate_tenant(good) == good


def test_fingerprint_round_trip_and_differences() -> None:
    fp = ModelFingerprint("llama", 30, 3, 64, 49152)
    assert ModelFingerprint.from_dict(fp.to_dict()) == fp
    assert fp.differences(fp) == []
    other = ModelFingerprint("llama", 4, 3, 32, 49152)
    assert other.differences(fp) == ["num_layers: prefix has 4, model has 30", "head_dim: prefix has 32, model has 64"]


@pytest.mark.parametrize(
    "bad",
    [None, [], {"architecture": "x"}, {**ModelFingerprint("a", 1, 1, 1, 1).to_dict(), "num_layers": "1"}],
)
def test_fingerprint_from_bad_dict(bad: object) -> None:
    with pytest.raises(InvalidPrefix):
        ModelFingerprint.from_dict(bad)
