"""One lm-eval run of the offline test tasks with the diffutron model, as a script for the data-parallel
test: started alone (one process) or under torchrun (several); rank 0 writes the aggregate results and
the logged samples as JSON to OUT, each rank the number of requests it scored to OUT.rankN.

    python -m torch.distributed.run --standalone --nproc_per_node 2 lm_eval_dp_run.py CHECKPOINT TASKS OUT
"""

import json
import sys


def main(checkpoint: str, tasks: str, out: str, *model_args: str) -> None:
    import lm_eval
    from lm_eval.tasks import TaskManager

    from diffutron_engine.integrations.lm_eval import DiffutronLM

    extra = dict(a.split("=", 1) for a in model_args)
    lm = DiffutronLM(pretrained=checkpoint, mc_num=8, batch_size=4, device="cpu", dtype="float32",
                     max_new_tokens=8, steps=8, block_size=8, token_budget=256, **extra)
    scored = {}
    for kind in ("loglikelihood", "generate_until"):
        def counted(requests, *a, _real=getattr(lm, kind), _kind=kind, **k):
            scored[_kind] = scored.get(_kind, 0) + len(requests)
            return _real(requests, *a, **k)

        setattr(lm, kind, counted)
    res = lm_eval.simple_evaluate(model=lm, tasks=["diffutron_tr_mc", "diffutron_tr_gen"],
                                  task_manager=TaskManager(include_path=tasks, include_defaults=False),
                                  random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0,
                                  log_samples=True)
    with open(f"{out}.rank{lm.rank}", "w", encoding="utf-8") as f:  # the requests this process scored
        json.dump(scored, f)
    if lm.rank == 0:
        samples = {task: sorted(({"doc_id": s["doc_id"], "resps": s["resps"], "filtered_resps": s["filtered_resps"],
                                  **{m: s[m] for m in s["metrics"]}} for s in rows), key=lambda s: s["doc_id"])
                   for task, rows in res["samples"].items()}
        with open(out, "w", encoding="utf-8") as f:
            json.dump({"results": res["results"], "samples": samples, "world_size": lm.world_size}, f,
                      ensure_ascii=False, default=str)
    else:
        assert res is None


if __name__ == "__main__":
    main(*sys.argv[1:])
