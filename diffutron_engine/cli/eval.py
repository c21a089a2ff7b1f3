"""`diffutron-engine eval KIND`: intrinsic metrics of a checkpoint on a text file.

KIND is `perplexity` (the Diffutron paper's masked-LM perplexity and masked-token accuracy, see
diffutron_engine.training.evaluate) or `lm-eval` (lm-evaluation-harness's own CLI with the `diffutron`
model registered: diffutron_engine.integrations.lm_eval; dispatched in cli/main.py).
Input and flags are checked before the model is loaded, so bad input fails fast with exit code 2.
"""

from __future__ import annotations

import json
import time

from ..errors import DiffutronError
from ..loading import DEVICES, DTYPES


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint (masked-LM perplexity)")
    kinds = p.add_subparsers(dest="eval_kind", metavar="KIND")
    kinds.required = True
    q = kinds.add_parser("perplexity", help="masked-LM perplexity and accuracy on a text file",
                         description="Mask a fixed-seed draw of the tokens of FILE (.txt: one document per "
                         "non-empty line; .jsonl: one object per line) and score the model on recovering them.")
    q.add_argument("--model", required=True, help="hub id or local directory")
    q.add_argument("--data", required=True, metavar="FILE", help=".txt (one document per line), .jsonl, .json or .parquet")
    q.add_argument("--text-field", default="text", help='field of each JSONL/JSON/parquet row (default: "text")')
    q.add_argument("--mlm-probability", type=float, default=0.15)
    q.add_argument("--max-length", type=int, default=512, help="tokens per sequence, bos and eos included")
    q.add_argument("--seed", type=int, default=0, help="seed of the masking draw")
    q.add_argument("--batch-size", type=int, default=8)
    q.add_argument("--dtype", default="auto", choices=DTYPES)
    q.add_argument("--device", default="auto", help=f"one of {', '.join(DEVICES)} or cuda:N (default: auto)")
    q.add_argument("--max-sequences", type=int, metavar="N", help="score only the first N sequences")
    q.add_argument("--json", action="store_true", help="print one JSON object")
    q.set_defaults(func=run)
    # dispatched before this parser runs (cli/main.py): lm-eval parses its own arguments
    kinds.add_parser("lm-eval", add_help=False, help="lm-evaluation-harness with the `diffutron` model (CETVEL "
                     "tasks, MC likelihood): diffutron-engine eval lm-eval --model_args pretrained=... --tasks ...")


def run(args) -> int:
    if not 0.0 < args.mlm_probability < 1.0:
        raise DiffutronError(f"--mlm-probability must lie in (0, 1), e.g. 0.15; got {args.mlm_probability}")
    for flag, value, least in (("--max-length", args.max_length, 3), ("--batch-size", args.batch_size, 1),
                               ("--max-sequences", args.max_sequences, 1)):
        if value is not None and value < least:
            raise DiffutronError(f"{flag} must be >= {least}, got {value}")
    from ..training.dataset import read_texts

    texts = read_texts([args.data], args.text_field)

    from ..loading import load_model
    from ..training.evaluate import masked_lm_perplexity

    lm = load_model(args.model, dtype=args.dtype, device=args.device)
    t0 = time.perf_counter()
    result = masked_lm_perplexity(lm.model, lm.tokenizer, texts, mlm_probability=args.mlm_probability,
                                  max_length=args.max_length, seed=args.seed, batch_size=args.batch_size,
                                  max_sequences=args.max_sequences)
    result.update(seconds=round(time.perf_counter() - t0, 3), model=args.model, data=args.data,
                  mlm_probability=args.mlm_probability, max_length=args.max_length, seed=args.seed,
                  device=lm.device, dtype=str(lm.dtype).removeprefix("torch."))
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
    else:
        print(f"perplexity {result['perplexity']:.4f}  accuracy {result['accuracy']:.2%}  "
              f"({result['tokens']:,} masked tokens in {result['sequences']:,} sequences; "
              f"p={args.mlm_probability:g}, max length {args.max_length}, seed {args.seed}; "
              f"{result['seconds']:.1f} s)")
    return 0
