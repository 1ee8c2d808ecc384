"""A Jepsen-style checker over the rounds every node recorded (their ``assigned`` lines).

Given every node's history, in the order it printed it, it asserts:

* one outcome per round: every node assigned round ``R`` saw the same members, in the
  same order (so the same ranks);
* ranks are dense and unique: ``members`` has no duplicate, and the node's rank is its
  position in ``members`` (no rank assigned twice, nobody in a round twice);
* no two rounds overlap on a node: the rounds a node is assigned strictly increase (it
  is never in two rounds at once, nor back in an older one).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

Line = Mapping[str, Any]


class Violation(AssertionError):
    """The recorded rounds break an invariant (the message says which, with the lines)."""


def check_rounds(histories: Mapping[str, Iterable[Line]]) -> dict[int, tuple[str, ...]]:
    """Check every node's history; return each round's members (rank order)."""
    rounds: dict[int, tuple[str, ...]] = {}
    seen_by: dict[int, str] = {}
    for node, lines in histories.items():
        last = 0
        for line in lines:
            if line.get("event") != "assigned":
                continue
            number, members = int(line["round"]), tuple(line["members"])
            if line["node"] != node:
                raise Violation(f"{node} recorded another node's assignment: {line}")
            if number <= last:
                raise Violation(f"{node}: round {number} assigned after round {last}: {line}")
            last = number
            if len(set(members)) != len(members) or line["world_size"] != len(members):
                raise Violation(f"{node}: round {number} has a member twice: {line}")
            if not 0 <= line["rank"] < len(members) or members[line["rank"]] != node:
                raise Violation(f"{node}: rank {line['rank']} is not its place in {members}")
            if rounds.setdefault(number, members) != members:
                raise Violation(
                    f"round {number}: {seen_by[number]} saw members {rounds[number]}, "
                    f"{node} saw {members}"
                )
            seen_by.setdefault(number, node)
    return rounds
