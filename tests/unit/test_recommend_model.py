"""The recommend model and its evaluation, called directly."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from aimesh_recommend import model as mf
from aimesh_recommend.evaluation import leave_last_out, planted, read_movielens
from aimesh_recommend.scoring import ScoreRequest, ServingModel, score_batch
from aimesh_recommend.training import evaluate

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def trained() -> tuple[mf.MatrixFactorization, dict[str, float]]:
    split = leave_last_out(planted())
    model = mf.train(split.train, mf.TrainingOptions(epochs=20), CPU)
    return model, evaluate(model, split, CPU)


def test_beats_popularity_twice_on_planted_groups(
    trained: tuple[mf.MatrixFactorization, dict[str, float]],
) -> None:
    _, metrics = trained
    assert metrics["hr_at_10"] >= 2 * metrics["popularity_hr_at_10"], metrics
    assert metrics["ndcg_at_10"] > metrics["popularity_ndcg_at_10"]


def test_artifact_round_trips_without_pickle(
    trained: tuple[mf.MatrixFactorization, dict[str, float]],
) -> None:
    model, _ = trained
    state = mf.from_bytes(mf.to_bytes(model))
    assert torch.equal(state["item.weight"], model.item.weight.detach())


def test_an_artifact_that_is_not_a_state_dict_is_refused(tmp_path: Path) -> None:
    import io

    buffer = io.BytesIO()
    torch.save({"something": torch.zeros(2)}, buffer)
    with pytest.raises(ValueError, match="state dict"):
        mf.from_bytes(buffer.getvalue())
    # An arbitrary object is refused by weights_only before we look at it.
    buffer = io.BytesIO()
    torch.save({"user.weight": Path("/")}, buffer)
    with pytest.raises(Exception):  # noqa: B017 - torch's UnpicklingError
        mf.from_bytes(buffer.getvalue())


def test_cancel_stops_within_a_batch() -> None:
    data = leave_last_out(planted(users=50, items=40, per_user=5)).train
    calls = []

    def stop() -> bool:
        calls.append(1)
        return len(calls) > 1

    with pytest.raises(mf.Cancelled):
        mf.train(data, mf.TrainingOptions(epochs=50, batch_size=16), CPU, should_stop=stop)
    assert len(calls) == 2


def test_scoring_leaves_out_seen_and_deleted_items() -> None:
    state = {
        "user.weight": torch.tensor([[1.0, 0.0], [0.0, 1.0]]),
        "item.weight": torch.tensor([[3.0, 0.0], [2.0, 0.0], [1.0, 0.0], [0.0, 5.0]]),
        "item_bias.weight": torch.zeros(4, 1),
    }
    serving = ServingModel(
        "v1", state, ["users/a", "users/b"], ["a", "b", "c", "d"], [("users/a", "a")], CPU
    )
    serving.set_catalogue({"a", "b", "c", "d"})
    exclude = tuple(serving.seen[0])
    first, second = score_batch([ScoreRequest(serving, 0, exclude), ScoreRequest(serving, 1, ())])
    assert [serving.item_ids[i] for i in first.rows] == ["b", "c", "d"]
    assert serving.item_ids[second.rows[0]] == "d"
    serving.set_active("b", False)
    (again,) = serving.score([ScoreRequest(serving, 0, exclude)])
    assert [serving.item_ids[i] for i in again.rows] == ["c", "d"]
    assert again.scores == [1.0, 0.0]
    serving.set_active("b", True)
    (back,) = serving.score([ScoreRequest(serving, 0, exclude)])
    assert [serving.item_ids[i] for i in back.rows] == ["b", "c", "d"]
    serving.set_active("b", False)
    similar = serving.similar(0, 2)
    assert [serving.item_ids[i] for i in similar.rows] == ["c", "d"]  # b inactive, d orthogonal
    assert math.isclose(similar.scores[0], 1.0, rel_tol=1e-6)


def test_reads_movielens_formats(tmp_path: Path) -> None:
    one_m = tmp_path / "ratings.dat"
    one_m.write_text("1::10::5::100\n1::11::3::101\n")
    hundred_k = tmp_path / "u.data"
    hundred_k.write_text("1\t10\t5\t100\n")
    latest = tmp_path / "ratings.csv"
    latest.write_text("userId,movieId,rating,timestamp\n1,10,4.5,100\n")
    assert read_movielens(one_m) == [("u1", "i10", 5.0, 100.0), ("u1", "i11", 3.0, 101.0)]
    assert read_movielens(hundred_k) == [("u1", "i10", 5.0, 100.0)]
    assert read_movielens(latest) == [("u1", "i10", 4.5, 100.0)]
    bad = tmp_path / "bad.dat"
    bad.write_text("1::10::five::100\n")
    with pytest.raises(ValueError, match=r"bad\.dat:1"):
        read_movielens(bad)
