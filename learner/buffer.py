"""The staleness-bounded, exactly-once group buffer between rollout workers and the trainer.

Thread-safe and free of gRPC servers and Ray, so it is tested on its own (like
AReaL-lite's staleness manager). It owns:
* admission: a group is a DUPLICATE if its group_id was accepted before with the
  same traj ids (not counted again), STALE if its oldest generated token is more
  than `max_staleness` versions behind the learner, else ACCEPTED; when the buffer
  is full `put` waits (up to its timeout) and then says RETRY_LATER, never drops;
* taking: `get_batch` re-checks staleness (the learner moved on while the group
  waited), drops and counts stale groups, and records the staleness histogram;
* counters, rejections per reason (the server's validation reports them here, so
  all numbers live in one place), and a `state_dict` holding the seen-set and the
  waiting groups, so a learner restarted from a checkpoint neither loses nor
  double-counts a group.
"""

from __future__ import annotations

import collections
import hashlib
import threading
import time
from typing import Any, Optional

import grpc
import numpy as np

from protos import learner_pb2 as pb
from protos.codec import dumps, loads
from protos.records import Group

# The one gRPC status code of each ack kind (documented in protos/learner.proto).
ACK_CODES = {
    pb.ACCEPTED: grpc.StatusCode.OK,
    pb.DUPLICATE: grpc.StatusCode.ALREADY_EXISTS,
    pb.STALE: grpc.StatusCode.FAILED_PRECONDITION,
    pb.REJECTED: grpc.StatusCode.INVALID_ARGUMENT,
    pb.RETRY_LATER: grpc.StatusCode.RESOURCE_EXHAUSTED,
}
COUNTERS = ("accepted", "duplicate", "stale_at_put", "stale_at_take", "rejected", "retry_later", "taken",
            "trajectories_accepted", "failed_trajectories")


def make_ack(group_id: str, kind: int, version: int, reason: str = "", detail: str = "",
             retry_after_s: float = 0.0) -> pb.Ack:
    return pb.Ack(group_id=group_id, kind=kind, code=ACK_CODES[kind].value[0], reason=reason, detail=detail,
                  learner_version=version, retry_after_s=retry_after_s)


def oldest_version(group: Group) -> int:
    """Version of the group's oldest generated token (what staleness is measured from)."""
    # One pass over the group's tokens laid end to end rather than one per trajectory (same minimum).
    trajs = group.trajectories
    on = np.concatenate([t.loss_mask for t in trajs]) == 1 if trajs else np.zeros(0, bool)
    if not on.any():
        raise ValueError(f"group {group.group_id} has no generated token")
    return int(np.concatenate([t.policy_version for t in trajs])[on].min())


def fingerprint(group: Group) -> str:
    """Identity of a group for exactly-once: its traj ids, order-free."""
    ids = sorted(t.traj_id for t in group.trajectories)
    return hashlib.blake2b("\0".join(ids).encode(), digest_size=8).hexdigest()


class GroupBuffer:
    """FIFO of accepted groups with a capacity, a staleness bound and an exactly-once seen-set."""

    def __init__(self, capacity: int, max_staleness: int, *, dedup_window: int = 1_000_000,
                 retry_after_s: float = 1.0) -> None:
        if capacity < 1 or max_staleness < 0 or dedup_window < 1:
            raise ValueError(f"bad buffer sizes: capacity={capacity}, max_staleness={max_staleness}, "
                             f"dedup_window={dedup_window}")
        self.capacity = capacity
        self.max_staleness = max_staleness
        self.dedup_window = dedup_window
        self.retry_after_s = retry_after_s
        self._cond = threading.Condition()
        self._groups: collections.deque[tuple[Group, int]] = collections.deque()  # (group, oldest version)
        self._seen: collections.OrderedDict[str, str] = collections.OrderedDict()  # group_id -> fingerprint
        self._counters = dict.fromkeys(COUNTERS, 0)
        self._rejected: dict[str, int] = {}
        self._staleness: dict[int, int] = {}
        self._closed = False

    def __len__(self) -> int:
        with self._cond:
            return len(self._groups)

    def put(self, group: Group, current_version: int, timeout: float = 0.0) -> pb.Ack:
        """Admit one (validated) group; waits up to `timeout` s for space before answering RETRY_LATER."""
        oldest = oldest_version(group)
        fp = fingerprint(group)
        gid = group.group_id
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                # Re-checked after every wait: another stream may have delivered the same group meanwhile.
                seen = self._seen.get(gid)
                if seen == fp:
                    self._counters["duplicate"] += 1
                    return make_ack(gid, pb.DUPLICATE, current_version, "duplicate", "already accepted")
                if seen is not None:
                    self._reject_locked("group_id_reused")
                    return make_ack(gid, pb.REJECTED, current_version, "group_id_reused",
                                    "group id accepted before with different traj ids")
                if current_version - oldest > self.max_staleness:
                    self._counters["stale_at_put"] += 1
                    return make_ack(gid, pb.STALE, current_version, "stale",
                                    f"oldest token version {oldest} is {current_version - oldest} behind "
                                    f"version {current_version} (max_staleness {self.max_staleness})")
                if len(self._groups) < self.capacity and not self._closed:
                    self._accept_locked(group, oldest, fp)
                    return make_ack(gid, pb.ACCEPTED, current_version)
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    self._counters["retry_later"] += 1
                    return make_ack(gid, pb.RETRY_LATER, current_version, "buffer_full",
                                    f"{len(self._groups)}/{self.capacity} groups waiting", self.retry_after_s)
                self._cond.wait(left)

    def _accept_locked(self, group: Group, oldest: int, fp: str) -> None:
        self._groups.append((group, oldest))
        self._seen[group.group_id] = fp
        while len(self._seen) > self.dedup_window:
            self._seen.popitem(last=False)
        self._counters["accepted"] += 1
        self._counters["trajectories_accepted"] += len(group.trajectories)
        self._counters["failed_trajectories"] += sum(t.status.value == "FAILED" for t in group.trajectories)
        self._cond.notify_all()

    def get_batch(self, n_groups: int, current_version: int, timeout: Optional[float] = None) -> list[Group]:
        """Exactly `n_groups` fresh groups, oldest first; [] if they are not there within `timeout` s.

        Groups that became stale while waiting are dropped (and counted) first.
        On [] nothing is taken: the waiting groups stay for the next call.
        """
        if not 1 <= n_groups <= self.capacity:
            raise ValueError(f"n_groups={n_groups} must be in [1, capacity={self.capacity}]")
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                self._drop_stale_locked(current_version)
                if len(self._groups) >= n_groups:
                    batch = [self._groups.popleft() for _ in range(n_groups)]
                    for _, oldest in batch:
                        lag = current_version - oldest
                        self._staleness[lag] = self._staleness.get(lag, 0) + 1
                    self._counters["taken"] += n_groups
                    self._cond.notify_all()  # space for blocked submitters
                    return [g for g, _ in batch]
                left = None if deadline is None else deadline - time.monotonic()
                if self._closed or (left is not None and left <= 0):
                    return []
                self._cond.wait(left)

    def _drop_stale_locked(self, current_version: int) -> None:
        fresh = [(g, o) for g, o in self._groups if current_version - o <= self.max_staleness]
        dropped = len(self._groups) - len(fresh)
        if dropped:
            self._counters["stale_at_take"] += dropped
            self._groups = collections.deque(fresh)
            self._cond.notify_all()

    def count_rejection(self, reason: str) -> None:
        """Record a group the server's validation rejected."""
        with self._cond:
            self._reject_locked(reason)

    def _reject_locked(self, reason: str) -> None:
        self._counters["rejected"] += 1
        self._rejected[reason] = self._rejected.get(reason, 0) + 1

    def seen_ids(self) -> list[str]:
        """The group ids in the exactly-once window, oldest first."""
        with self._cond:
            return list(self._seen)

    def close(self) -> None:
        """Wake every waiter: blocked puts answer RETRY_LATER, blocked get_batch returns []."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def stats(self) -> dict[str, Any]:
        """Counters, rejections per reason, staleness histogram (lag -> groups taken) and fill."""
        with self._cond:
            return {"counters": dict(self._counters), "rejected": dict(self._rejected),
                    "staleness": dict(self._staleness), "size": len(self._groups), "capacity": self.capacity}

    def state_dict(self) -> dict[str, Any]:
        """Everything a restart needs: waiting groups (codec bytes), the seen-set, counters. Plain types only."""
        with self._cond:
            return {"groups": [dumps(g) for g, _ in self._groups],
                    "seen": [[gid, fp] for gid, fp in self._seen.items()],
                    "counters": dict(self._counters), "rejected": dict(self._rejected),
                    "staleness": [[k, v] for k, v in self._staleness.items()]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        groups = [loads(b) for b in state["groups"]]
        if not all(isinstance(g, Group) for g in groups):
            raise ValueError("buffer state holds a record that is not a Group")
        with self._cond:
            self._groups = collections.deque((g, oldest_version(g)) for g in groups)
            self._seen = collections.OrderedDict((str(gid), str(fp)) for gid, fp in state["seen"])
            self._counters = {**dict.fromkeys(COUNTERS, 0), **{k: int(v) for k, v in state["counters"].items()}}
            self._rejected = {str(k): int(v) for k, v in state["rejected"].items()}
            self._staleness = {int(k): int(v) for k, v in state["staleness"]}
            self._cond.notify_all()

