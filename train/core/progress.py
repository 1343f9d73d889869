"""The training progress bar: it counts whichever bound will end the run.

A run stops at max_iters or after max_minutes, whichever comes first. The bar shows the
bound that is ahead (the larger of step / max_iters and time / budget):

    step-bound:  "42%|████      | 2100/5000 steps [01:10<01:37, loss=2.31 ...]"
    time-bound:  "38%|███▊      | 03:08/08:15 [05:07 left, step 1450, loss=2.31 ...]"

so under a time budget the ETA is the time left in the budget, not the time that
max_iters steps would take. Resumed runs start the bar where they left off.
"""

from tqdm import tqdm

STEP_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} steps [{elapsed}<{remaining}{postfix}]"
TIME_FORMAT = "{l_bar}{bar}| {n_time}/{total_time} [{remaining} left{postfix}]"


class _Bar(tqdm):
    """tqdm with the count and total also written as times (for the time-bound bar)."""

    @property
    def format_dict(self):
        d = super().format_dict
        d["n_time"] = self.format_interval(d["n"])
        d["total_time"] = self.format_interval(d["total"] or 0)
        return d


class Progress:
    def __init__(self, max_iters: int, max_minutes: float | None, enabled: bool = True) -> None:
        self.max_iters = max_iters
        self.budget_s = 60.0 * max_minutes if max_minutes else None
        self.enabled = enabled
        self.bar: _Bar | None = None
        self.by_time = False
        self.step = 0
        self.postfix = ""

    def _time_is_ahead(self, step: int, elapsed_s: float) -> bool:
        if self.budget_s is None:
            return False
        step_fraction = step / self.max_iters if self.max_iters else 1.0
        return elapsed_s / self.budget_s > step_fraction

    def update(self, step: int, elapsed_s: float) -> None:
        """Show `step` optimizer steps done after `elapsed_s` seconds of training in all."""
        self.step = step
        by_time = self._time_is_ahead(step, elapsed_s)
        if self.bar is None or by_time != self.by_time:
            self._open(by_time, step, elapsed_s)
        self.bar.n = round(elapsed_s, 1) if by_time else step
        self._show_postfix(refresh=False)
        self.bar.update(0)  # redraws at most every mininterval (0.1 s)

    def set_postfix(self, text: str) -> None:
        self.postfix = text
        if self.bar is not None:
            self._show_postfix()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def _open(self, by_time: bool, step: int, elapsed_s: float) -> None:
        self.close()
        self.by_time = by_time
        total, start, fmt = (
            (self.budget_s, round(elapsed_s, 1), TIME_FORMAT)
            if by_time
            else (self.max_iters, step, STEP_FORMAT)
        )
        # smoothing=0: the rate is the average since the bar opened, a steady ETA
        self.bar = _Bar(
            total=total,
            initial=start,
            bar_format=fmt,
            smoothing=0,
            disable=not self.enabled,
            dynamic_ncols=True,
        )

    def _show_postfix(self, refresh: bool = True) -> None:
        parts = [f"step {self.step}"] if self.by_time else []
        parts += [self.postfix] if self.postfix else []
        self.bar.set_postfix_str(", ".join(parts), refresh=refresh)
