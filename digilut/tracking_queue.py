"""The background thread that delivers a :class:`~digilut.tracking.Tracker`'s MLflow calls in order.

Training only enqueues (:meth:`CallQueue.put`); one daemon thread sends. A call that fails for a
transient reason (:func:`is_transient`: connection refused, timeout, 5xx) stays at the head of the
queue and is retried every ``retry_interval_s``; one that fails for good is dropped with a
warning. Consecutive metrics of one run go as one ``log_batch``. Beyond ``max_buffered`` queued
calls the oldest metrics are dropped (runs, params and artifacts are kept).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from digilut.errors import DigilutError

log = logging.getLogger(__name__)

# MLflow error codes of a server that is up but cannot serve now: worth retrying later.
_TRANSIENT_CODES = frozenset(
    {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED"}
)
_METRICS_PER_BATCH = 1000  # MLflow's log_batch limit


class Run(Protocol):
    """What a call is for (a :class:`~digilut.tracking.RunHandle`): named in messages."""

    name: str


@dataclass
class Call:
    kind: str
    run: Run
    fn: Callable[[], None] | None = None  # for kinds other than "metrics"
    metrics: tuple[tuple[str, float, int, int], ...] = ()  # (key, value, timestamp ms, step)


def is_transient(err: BaseException) -> bool:
    """Whether retrying later may succeed: the network or the server, not the call itself."""
    import requests
    from mlflow.exceptions import RestException

    if isinstance(err, DigilutError):  # our own (a model file that cannot be read): final
        return False
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:  # connection errors arrive wrapped
        seen.add(id(cause))
        if isinstance(cause, OSError | requests.RequestException) and not isinstance(cause, DigilutError):
            return True
        cause = cause.__cause__ or cause.__context__
    if isinstance(err, RestException):  # the server answered with an error
        return str(err.error_code) in _TRANSIENT_CODES
    return str(err).startswith("API request to")  # MLflow's HTTP layer (timeouts, 5xx)


class CallQueue:
    """Ordered, retrying delivery of calls to the MLflow server at ``uri`` by ``send(batch)``."""

    def __init__(
        self,
        send: Callable[[list[Call]], None],
        *,
        uri: str,
        retry_interval_s: float,
        flush_timeout_s: float,
        max_buffered: int,
    ) -> None:
        self._send = send
        self.uri = uri
        self.retry_interval_s = retry_interval_s
        self.flush_timeout_s = flush_timeout_s
        self.max_buffered = max_buffered
        self._queue: deque[Call] = deque()
        self._cond = threading.Condition()
        self._busy = False
        self._closed = False
        self._dropped = 0
        self._thread = threading.Thread(target=self._work, name="digilut-mlflow", daemon=True)
        self._thread.start()

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait up to ``timeout_s`` (default ``flush_timeout_s``) for queued calls; True if all went."""
        deadline = time.monotonic() + (self.flush_timeout_s if timeout_s is None else timeout_s)
        with self._cond:
            self._cond.notify_all()  # cut a retry wait short
            while self._queue or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.5))
        return True

    def close(self, timeout_s: float | None = None) -> bool:
        """Flush (bounded), stop the thread, and say whether everything was delivered."""
        if self._closed:
            return True
        ok = self.flush(timeout_s)
        with self._cond:
            self._closed = True
            left = len(self._queue) + self._busy
            self._cond.notify_all()
        if ok:
            self._thread.join(timeout=5)
        if not ok:
            log.warning(
                "MLflow at %s: %d call(s) not delivered after %.0fs (metrics remain in TensorBoard and "
                "the fold result files)",
                self.uri,
                left,
                self.flush_timeout_s if timeout_s is None else timeout_s,
            )
        if self._dropped:
            log.warning(
                "MLflow: %d call(s) dropped in total (refused by the server or buffer full)", self._dropped
            )
        return ok and not self._dropped

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._queue) + self._busy

    def put(self, call: Call) -> None:
        with self._cond:
            if self._closed:
                log.debug("MLflow tracker closed: %s call for %s ignored", call.kind, call.run.name)
                return
            if len(self._queue) >= self.max_buffered:
                for i, queued in enumerate(self._queue):  # drop the oldest metrics, keep structure
                    if queued.kind == "metrics":
                        del self._queue[i]
                        self._dropped += 1
                        break
            self._queue.append(call)
            self._cond.notify_all()

    def _take(self) -> list[Call] | None:
        """Block for the next call(s): consecutive metrics of one run are merged into one batch."""
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if not self._queue:
                return None
            head = self._queue[0]
            batch = [head]
            if head.kind == "metrics":
                n = len(head.metrics)
                for call in list(self._queue)[1:]:
                    if (
                        call.kind != "metrics"
                        or call.run is not head.run
                        or n + len(call.metrics) > _METRICS_PER_BATCH
                    ):
                        break
                    batch.append(call)
                    n += len(call.metrics)
            self._busy = True
            return batch

    def _work(self) -> None:
        down_since: float | None = None
        while True:
            batch = self._take()
            if batch is None:
                return
            try:
                self._send(batch)
                failed: BaseException | None = None
            except Exception as err:  # the thread must survive anything the client raises
                failed = err
            with self._cond:
                transient = failed is not None and is_transient(failed)
                if not transient:
                    for _ in batch:
                        self._queue.popleft()
                self._busy = False
                self._cond.notify_all()
            if failed is None:
                if down_since is not None:
                    log.warning(
                        "MLflow at %s reachable again after %.0fs; sending %d buffered call(s)",
                        self.uri,
                        time.monotonic() - down_since,
                        len(self._queue) + len(batch),
                    )
                    down_since = None
            elif not transient:
                self._dropped += len(batch)
                log.warning(
                    "MLflow refused %s for run %s (dropped): %s", batch[0].kind, batch[0].run.name, failed
                )
            else:
                if down_since is None:
                    down_since = time.monotonic()
                    log.warning(
                        "MLflow at %s unreachable (%s: %s); buffering calls and retrying every %.0fs — "
                        "training continues",
                        self.uri,
                        type(failed).__name__,
                        str(failed).splitlines()[0][:200] if str(failed) else "",
                        self.retry_interval_s,
                    )
                with self._cond:
                    if self._closed:  # close() has given up on the rest: stop trying
                        return
                    self._cond.wait(self.retry_interval_s)
