"""The execution graph: backward stops at the lowest trainable group; prefetches follow the rotation."""

from chunkft.planner.graph import prefetch_schedule, step_order


def test_backward_stops_at_lowest_trainable_layer() -> None:
    order = [n.name for n in step_order(4, 2)]
    assert order[:6] == [
        "fwd embed",
        "fwd layers.0",
        "fwd layers.1",
        "fwd layers.2",
        "fwd layers.3",
        "fwd head",
    ]
    assert order[6:] == ["bwd head", "bwd layers.3", "bwd layers.2"]
    full = [n.name for n in step_order(4, -1)]
    assert full[-2:] == ["bwd layers.0", "bwd embed"]
    assert [n.name for n in step_order(4, 4)][-1] == "bwd head"


def test_prefetch_two_slots_fetches_two_ahead() -> None:
    ops = prefetch_schedule((0, 1, 2, 3), 2)
    assert [op.chunk for op in ops] == [2, 3, 0, 1]
    assert ops[0].issue_after == "update chunk 0" and ops[0].needed_by == "update chunk 2"


def test_prefetch_one_slot_and_rotation_order() -> None:
    ops = prefetch_schedule((3, 1, 0, 2), 1)
    assert [(op.issue_after, op.chunk) for op in ops] == [
        ("update chunk 3", 1),
        ("update chunk 1", 0),
        ("update chunk 0", 2),
        ("update chunk 2", 3),
    ]
    assert prefetch_schedule((0,), 2) == ()
