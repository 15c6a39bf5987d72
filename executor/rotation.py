"""Which window is active: bottom-up, top-down or seeded random rotation over the K chunks.

A cycle visits every chunk once; each visit lasts `update_interval` optimizer steps. A rotation may start
at any chunk (`start_chunk`): it begins at that chunk's place in the first cycle's order. The random order
draws a fresh permutation per cycle from (seed, cycle) alone, so the resumable state is just the
position (cycle, index in the cycle, steps taken in the current window): no generator state to save.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

RotationOrder = Literal["bottom-up", "top-down", "random"]
ROTATION_ORDERS: tuple[str, ...] = ("bottom-up", "top-down", "random")


@dataclass(frozen=True)
class RotationSpec:
    """How windows take turns: the visiting order and how many optimizer steps each visit lasts."""

    order: RotationOrder
    update_interval: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.order not in ROTATION_ORDERS:
            raise ValueError(
                f"rotation order {self.order!r} is unknown; use one of {', '.join(ROTATION_ORDERS)}"
            )
        if self.update_interval < 1:
            raise ValueError(f"rotation update_interval must be >= 1, got {self.update_interval}")


@dataclass(frozen=True)
class RotationPosition:
    """Where the rotation stands: the whole resumable state."""

    cycle: int
    position: int  # index into the cycle's order
    steps_in_window: int  # optimizer steps already taken on the current window


def cycle_order(spec: RotationSpec, num_chunks: int, cycle: int) -> tuple[int, ...]:
    """The chunk indices visited in `cycle`, in visiting order."""
    if num_chunks < 1:
        raise ValueError(f"rotation needs at least one chunk, got {num_chunks}")
    if spec.order == "bottom-up":
        return tuple(range(num_chunks))
    if spec.order == "top-down":
        return tuple(range(num_chunks - 1, -1, -1))
    # A string seed is hashed with SHA-512 by random.Random: stable across Python versions and platforms.
    order = list(range(num_chunks))
    random.Random(f"chunkft-rotation:{spec.seed}:{cycle}").shuffle(order)
    return tuple(order)


def start_position(spec: RotationSpec, num_chunks: int, start_chunk: int | None) -> RotationPosition:
    """Where a rotation that first trains `start_chunk` begins: that chunk's place in cycle 0's order, as if
    the rotation had just arrived there (a random order's first cycle is then only its remaining part).
    None: the order's own first chunk (0 bottom-up, K-1 top-down)."""
    if start_chunk is None:
        return RotationPosition(0, 0, 0)
    if isinstance(start_chunk, bool) or not isinstance(start_chunk, int):
        raise TypeError(f"start_chunk must be an int, got {type(start_chunk).__name__}")
    if not 0 <= start_chunk < num_chunks:
        raise ValueError(f"start_chunk {start_chunk} is not a chunk index; use 0..{num_chunks - 1}")
    return RotationPosition(0, cycle_order(spec, num_chunks, 0).index(start_chunk), 0)


def windows_reached(
    spec: RotationSpec, num_chunks: int, steps: int, start_chunk: int | None = None
) -> set[int]:
    """The chunk indices a run of `steps` optimizer steps (none skipped) trains at least once.

    Only the first 2K visits are walked: from any place in cycle 0 they include all of cycle 1.
    """
    rot = Rotation(spec, num_chunks, start_chunk=start_chunk)
    visits = min(-(-steps // spec.update_interval), 2 * num_chunks)
    reached = set()
    for _ in range(visits):
        reached.add(rot.current())
        for _ in range(spec.update_interval):
            rot.advance()
    return reached


class Rotation:
    """The rotation's position over K chunks; advance() once per (non-skipped) optimizer step."""

    def __init__(self, spec: RotationSpec, num_chunks: int, start_chunk: int | None = None) -> None:
        self.spec = spec
        self.num_chunks = num_chunks
        self._pos = start_position(spec, num_chunks, start_chunk)
        self._order = cycle_order(spec, num_chunks, 0)

    @property
    def position(self) -> RotationPosition:
        return self._pos

    def current(self) -> int:
        """The chunk index active now."""
        return self._order[self._pos.position]

    def advance(self) -> bool:
        """Count one optimizer step on the current window; True when the active chunk index changed."""
        before = self.current()
        cycle, position, steps = self._pos.cycle, self._pos.position, self._pos.steps_in_window + 1
        if steps == self.spec.update_interval:
            steps, position = 0, position + 1
            if position == self.num_chunks:
                cycle, position = cycle + 1, 0
                self._order = cycle_order(self.spec, self.num_chunks, cycle)
        self._pos = RotationPosition(cycle, position, steps)
        return self.current() != before

    def upcoming(self) -> int | None:
        """The next chunk index, different from the current one, that the rotation will activate.

        None when there is only one chunk. Used for prefetching: a random order may repeat a chunk across
        a cycle boundary, in which case the first different one is returned.
        """
        if self.num_chunks == 1:
            return None
        now = self.current()
        cycle, position = self._pos.cycle, self._pos.position
        order = self._order
        while True:
            position += 1
            if position == self.num_chunks:
                cycle, position = cycle + 1, 0
                order = cycle_order(self.spec, self.num_chunks, cycle)
            if order[position] != now:
                return order[position]

    def state_dict(self) -> dict[str, int]:
        return {
            "cycle": self._pos.cycle,
            "position": self._pos.position,
            "steps_in_window": self._pos.steps_in_window,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        pos = RotationPosition(int(state["cycle"]), int(state["position"]), int(state["steps_in_window"]))
        if pos.cycle < 0 or not 0 <= pos.position < self.num_chunks:
            raise ValueError(f"rotation state {state} does not fit {self.num_chunks} chunks")
        if not 0 <= pos.steps_in_window < self.spec.update_interval:
            raise ValueError(
                f"rotation state steps_in_window={pos.steps_in_window} does not fit "
                f"update_interval={self.spec.update_interval}"
            )
        self._pos = pos
        self._order = cycle_order(self.spec, self.num_chunks, pos.cycle)
