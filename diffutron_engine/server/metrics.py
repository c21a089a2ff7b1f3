"""/metrics in Prometheus' text format: what the HTTP side counts (requests by outcome, tokens) and what
the engine loop measures (steps, the running batch, failures), rendered in one place."""

from __future__ import annotations

import threading

from .loop import STEP_BUCKETS, EngineLoop

# a request's outcomes, as the `outcome` label reports them
OUTCOMES = ("ok", "rejected", "unauthorized", "too_large", "timeout", "disconnected", "failed", "shutdown")


class Metrics:
    def __init__(self, loop: EngineLoop):
        self.loop = loop
        self._lock = threading.Lock()  # counted from the event loop and from tokenizer threads
        self.outcomes: dict[str, int] = dict.fromkeys(OUTCOMES, 0)
        self.prompt_tokens = self.generated_tokens = 0

    def outcome(self, name: str) -> None:
        with self._lock:
            self.outcomes[name] = self.outcomes.get(name, 0) + 1

    def tokens(self, prompt: int, generated: int) -> None:
        with self._lock:
            self.prompt_tokens += prompt
            self.generated_tokens += generated

    def render(self) -> str:
        stats = self.loop.stats
        with self._lock:
            outcomes, prompt, generated = dict(self.outcomes), self.prompt_tokens, self.generated_tokens
        lines = ["# HELP diffutron_requests_total HTTP completion requests by how they ended.",
                 "# TYPE diffutron_requests_total counter"]
        lines += [f'diffutron_requests_total{{outcome="{k}"}} {v}' for k, v in sorted(outcomes.items())]
        lines += _metric("prompt_tokens_total", "counter", "Prompt tokens of the requests answered.", prompt)
        lines += _metric("generation_tokens_total", "counter", "Tokens generated for the requests answered.",
                         generated)
        lines += _metric("requests_in_flight", "gauge", "Engine requests added and not yet finished.",
                         self.loop.in_flight)
        lines += _metric("running_batch_size", "gauge", "Rows of the running batch after the last step.",
                         stats.running)
        lines += _metric("failed_steps_total", "counter", "Engine steps that raised.", stats.failed_steps)
        lines += _metric("failed_requests_total", "counter", "Engine requests ended by a failed step.",
                         stats.failed_requests)
        lines += ["# HELP diffutron_step_seconds Wall time of one engine step.",
                  "# TYPE diffutron_step_seconds histogram"]
        total = 0
        for bound, count in zip(STEP_BUCKETS + (float("inf"),), list(stats.step_hist)):
            total += count
            lines.append(f'diffutron_step_seconds_bucket{{le="{"+Inf" if bound == float("inf") else bound}"}} {total}')
        lines += [f"diffutron_step_seconds_sum {stats.step_sum}", f"diffutron_step_seconds_count {total}"]
        return "\n".join(lines) + "\n"


def _metric(name: str, kind: str, help_: str, value) -> list[str]:
    return [f"# HELP diffutron_{name} {help_}", f"# TYPE diffutron_{name} {kind}", f"diffutron_{name} {value}"]
