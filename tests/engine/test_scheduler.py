"""The scheduler alone: plain Python requests, no model."""

import time

from diffutron_engine.config import SamplingParams
from diffutron_engine.engine.request import Request, Status
from diffutron_engine.engine.scheduler import Scheduler
from diffutron_engine.engine.text import AnswerState

MASK = 4


class _Tok:
    eos_token_id = 1

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def req(i, length, params=SamplingParams(max_new_tokens=4, block_size=2, steps=4)):
    tokens = [5] * length + [MASK] * 4
    return Request(request_id=str(i), index=i, prompt_ids=tokens[:length], params=params, seed=i, tokens=tokens,
                   blocks=[(length, length + 2), (length + 2, length + 4)], schedules=[[1, 1], [1, 1]],
                   answer_start=length, given=list(range(length)), answer=AnswerState(_Tok(), tokens, length, MASK))


def test_admission_respects_max_batch_and_prefers_the_running_bucket():
    s = Scheduler(max_batch=2, bucket_width=16)
    a, b, c, d = req(0, 10), req(1, 100), req(2, 12), req(3, 14)
    for r in (a, b, c, d):
        s.add(r)
    first = s.schedule()
    assert [r.request_id for r in first] == ["0", "2"]  # the oldest request's bucket first: 10 and 12, not 100
    assert all(r.status is Status.RUNNING for r in first) and s.num_waiting == 2
    # request 0 leaves: its slot goes to the same-bucket request 3 before the long one
    a.finish("complete")
    s.retire([a])
    assert [r.request_id for r in s.schedule()] == ["2", "3"]


def test_abort_while_waiting_or_running():
    s = Scheduler(max_batch=1)
    a, b, c = req(0, 3), req(1, 3), req(2, 3)
    for r in (a, b, c):
        s.add(r)
    assert s.schedule() == [a]
    assert s.remove(b) and s.num_waiting == 1  # waiting: skipped when met
    assert s.remove(a) and s.running == []
    assert s.schedule() == [c] and not s.remove(b)


def test_a_request_of_a_rare_length_is_not_starved():
    s = Scheduler(max_batch=1, bucket_width=16)
    s.add(req(0, 10))
    assert [r.request_id for r in s.schedule()] == ["0"]
    far = req(999, 500)
    s.add(far)
    admitted = []
    for i in range(1, 20):  # a steady stream of requests in the running bucket
        s.add(req(i, 10))
        running = s.running[0]
        running.finish("complete")
        s.retire([running])
        admitted.append(s.schedule()[0].request_id)
    assert "999" in admitted and admitted.index("999") <= s.max_bypass


def test_admission_is_logarithmic_in_the_queue():
    """20,000 waiting requests of many lengths: a schedule() that admits a few stays well under 0.1 ms
    per admitted request (no sorting of the queue)."""
    s = Scheduler(max_batch=8, bucket_width=16)
    for i in range(20_000):
        s.add(req(i, 3 + (i * 7919) % 2000))
    s.schedule()
    times = []
    for _ in range(200):
        done = s.running[:2]
        for r in done:
            r.finish("complete")
        s.retire(done)
        t = time.perf_counter()
        s.schedule()
        times.append(time.perf_counter() - t)
    times.sort()
    assert times[len(times) // 2] < 1e-4, times[len(times) // 2]
    assert len(s.running) == 8 and s.num_waiting == 20_000 - 8 - 400
