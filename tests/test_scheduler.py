"""The scheduler alone: plain Python requests, no model."""

from diffutron_engine.config import SamplingConfig
from diffutron_engine.engine.request import Request, Status
from diffutron_engine.engine.scheduler import Scheduler

MASK = 4


def req(i, length, cfg=SamplingConfig(max_new_tokens=4, block_size=2, steps=4)):
    tokens = [5] * length + [MASK] * 4
    return Request(id=i, prompt_ids=tokens[:length], config=cfg, seed=i, tokens=tokens,
                   windows=[(length, length + 2), (length + 2, length + 4)], answer_start=length)


def test_admission_respects_max_batch_and_prefers_the_running_bucket():
    s = Scheduler(max_batch=2, mask_id=MASK, is_final=lambda r: False, bucket_width=16)
    a, b, c, d = req(0, 10), req(1, 100), req(2, 12), req(3, 14)
    for r in (a, b, c, d):
        s.add(r)
    first = s.schedule()
    assert [r.id for r in first] == [0, 2]  # the oldest request's bucket first: 10 and 12, not 100
    assert all(r.status is Status.RUNNING for r in first) and len(s.waiting) == 2
    # finish request 0: its slot goes to the same-bucket request 3 before the long one
    a.tokens[10:] = [7, 7, 7, 7]
    assert s.postprocess(first) == [a] and a.finish_reason == "complete"
    assert [r.id for r in s.schedule()] == [2, 3]


def test_blocks_advance_and_early_stop_retires():
    s = Scheduler(max_batch=4, mask_id=MASK, is_final=lambda r: r.tokens[r.answer_start] == 1)
    r = req(0, 3)
    s.add(r)
    s.schedule()
    r.tokens[3:5] = [8, 8]
    r.step = 1
    s.postprocess([r])
    assert r.block == 1 and r.step == 0 and r.status is Status.RUNNING
    r2 = req(1, 3, SamplingConfig(max_new_tokens=4, block_size=2, steps=4, early_stop=True))
    s.add(r2)
    s.schedule()
    r2.tokens[3] = 1
    assert s.postprocess([r2]) == [r2] and r2.finish_reason == "answer ended"


def test_a_request_with_nothing_to_fill_finishes_at_once():
    s = Scheduler(max_batch=1, mask_id=MASK, is_final=lambda r: False)
    r = req(0, 3)
    r.tokens = [5] * 7
    s.add(r)
    assert r.status is Status.FINISHED and not s.has_work()
