#!/usr/bin/env python3
"""The quiet console of the recipes (egs/tools/run_logged.sh): read a command's merged stdout + stderr
from stdin, write every line, byte for byte, to --log, and show on stderr only

* a progress bar: training updates (--updates N: fairseq's ``num_updates=N`` / ``| num_updates N``
  lines, train and valid loss in the postfix), decoded sentences (--sentences N: one per distinct
  ``H-<id>`` line of fairseq-generate, the speed in the postfix), ``label: N/M`` or ``label N/M``
  progress lines (--fraction, one bar per label), or lines matching a regular expression (--count REGEX);
* the lines that are real errors: a ``Traceback`` with its frames and exception, and lines with
  ``error:``, ``...Error`` or ``ERROR``, unless they are warnings (FutureWarning, UserWarning,
  deprecation_warning, fairseq's ``| WARNING |``, fairseq-accel-prepare's ``warning:`` and ``skipping``
  lines), INFO lines or fairseq-generate's per-sentence lines.

Everything else (hydra and torch warnings, model printouts, per-interval log lines, hypotheses) only goes
to the log. When stderr is a terminal the bar is a live tqdm bar; otherwise (CI, tests, ``| tee``) the
same bar is printed as one line at 25, 50 and 75 % and one at the end (100 %, or where the command
stopped), so captured consoles never fill with carriage-return updates.

The exit status is 0 unless the log cannot be written; the command's own status is run_logged.sh's job.
"""
import argparse
import os
import re
import signal
import sys
import time
from typing import BinaryIO, Dict, Iterator, Optional, Set, TextIO

try:
    from tqdm import tqdm
except ImportError:  # a python3 without fairseq's dependencies: plain "n/total" lines instead
    tqdm = None

#: Lines that are noise even when they mention an error (warnings, logger INFO/WARNING lines).
NOISE = re.compile(r"Warning\b|warnings\.warn|deprecation_warning|Please install tensorboardX|"
                   r"\| (?:INFO|WARNING|DEBUG) \||^(?:warning|skipping)\b")
#: Lines that report a real error.
ERROR = re.compile(r"^Traceback \(most recent call last\)|\berror:|[A-Za-z]*Error\b|\bERROR\b|"
                   r"^Killed\b|Segmentation fault|out of memory")
#: fairseq-generate's per-sentence lines (source, target, hypothesis, detokenized, scores): never errors.
SENTENCE = re.compile(r"^[STHDPWVE]-\d+\t")
NUM_UPDATES = re.compile(r"num_updates\"?[=:\s]+\"?(\d+)|@ (\d+) updates")
TRAIN_LOSS = re.compile(r"(?:^|[\s|,{])\"?loss\"?(?:=|:? )\"?(-?[\d.]+(?:e-?\d+)?)")
HYPOTHESIS = re.compile(r"^H-(\d+)\t")
SPEED = re.compile(r"\(([\d.]+) sentences/s")
FRACTION = re.compile(r"^(?:[\w-]+: )?([\w .-]+?):? (\d+)/(\d+)\b")
MILESTONES = (25, 50, 75, 100)


def terminal_columns(stream: TextIO) -> int:
    """The width of the terminal ``stream`` writes to (0 when unknown)."""
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError):
        return 0


class Progress:
    """One progress bar: a live tqdm bar on a terminal, else one printed line per milestone."""

    def __init__(self, desc: str, total: Optional[int], unit: str, stream: TextIO, live: bool,
                 position: int = 0) -> None:
        self.desc, self.total, self.unit, self.stream, self.live = desc, total or None, unit, stream, live
        self.n = 0
        self.postfix: Dict[str, str] = {}
        self.start = time.time()
        self.printed_n = 0
        self.printed_pct = 0
        self.printed_postfix: Dict[str, str] = {}
        self.bar = None
        if live and tqdm is not None:
            sized = terminal_columns(stream) > 0  # a terminal without a size would get an empty bar
            self.bar = tqdm(total=self.total, desc=desc, unit=unit, file=stream, mininterval=0.5,
                            dynamic_ncols=sized, ncols=None if sized else 100, nrows=None if sized else 24,
                            leave=True, position=position)

    def update_to(self, n: int) -> None:
        """Move the bar to ``n`` (a resumed training may start above 0)."""
        if n == self.n:
            return
        if self.bar is not None:
            self.bar.update(n - self.n)
        self.n = n
        if not self.live and self.total:
            pct = max([m for m in MILESTONES if 100 * n >= m * self.total] or [0])
            if self.printed_pct < pct < 100:  # 100 % waits for close(), when the postfix is final
                self.printed_pct = pct
                self._print_line()

    def set_postfix(self, **values: str) -> None:
        """Show ``key=value`` after the bar (e.g. the last training loss)."""
        self.postfix = dict(sorted({**self.postfix, **values}.items()))  # loss before valid_loss
        if self.bar is not None:
            self.bar.set_postfix(self.postfix, refresh=False)

    def write(self, line: str) -> None:
        """Print ``line`` above a live bar, or as it is."""
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def close(self, final_line: bool = True) -> None:
        """End the bar; a printed bar gets a last line (100 %, or where it stopped) unless nothing changed."""
        if self.bar is not None:
            self.bar.close()
        elif final_line and self.n > 0 and (self.n > self.printed_n or self.postfix != self.printed_postfix):
            self._print_line()

    def _print_line(self) -> None:
        postfix = ", ".join(f"{key}={value}" for key, value in self.postfix.items())
        if tqdm is not None:
            line = tqdm.format_meter(self.n, self.total, time.time() - self.start, ncols=100, prefix=self.desc,
                                     ascii=True, unit=self.unit, postfix=postfix)
        else:
            done = f"{self.n}/{self.total}" if self.total else str(self.n)
            line = f"{self.desc}: {done} {self.unit}" + (f", {postfix}" if postfix else "")
        self.printed_n, self.printed_postfix = self.n, dict(self.postfix)
        print(line, file=self.stream, flush=True)


class ConsoleFilter:
    """Decides, line by line, what of a command's output reaches the console."""

    def __init__(self, args: argparse.Namespace, stream: TextIO, live: bool) -> None:
        self.args, self.stream, self.live = args, stream, live
        self.in_traceback = False
        self.hypotheses: Set[str] = set()
        self.bar: Optional[Progress] = None
        self.fraction_label = ""
        desc = args.desc or ""
        if args.updates is not None:
            self.bar = Progress(desc, args.updates, "upd", stream, live, args.position)
        elif args.sentences is not None:
            self.bar = Progress(desc, args.sentences, "sent", stream, live, args.position)
        elif args.count is not None:
            self.count = re.compile(args.count)
            self.bar = Progress(desc, args.total, args.unit, stream, live, args.position)

    def show(self, line: str) -> None:
        """Print ``line`` on the console, above the bar if there is one."""
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, file=self.stream, flush=True)

    def feed(self, line: str) -> None:
        """Handle one output line (without its newline)."""
        if self.is_error(line):
            self.show(line)
        args = self.args
        if args.updates is not None:
            self._training(line)
        elif args.sentences is not None:
            self._decoding(line)
        elif args.fraction:
            self._fraction(line)
        elif args.count is not None and self.count.search(line):
            self.bar.update_to(self.bar.n + 1)

    def is_error(self, line: str) -> bool:
        """True for a line of a Python traceback or one that reports an error (not a warning)."""
        if line.startswith("Traceback (most recent call last)"):
            self.in_traceback = True
            return True
        if self.in_traceback:
            if line and not line[0].isspace():  # the exception line ends the traceback
                self.in_traceback = False
            return True
        if SENTENCE.match(line) or NOISE.search(line):
            return False
        return bool(ERROR.search(line))

    def close(self) -> None:
        """End the bar at the end of the output (a --fraction bar only says it ended where it got to 100 %)."""
        if self.bar is not None:
            self.bar.close(final_line=not self.args.fraction or self.bar.n >= (self.bar.total or 0))

    def _training(self, line: str) -> None:
        match = NUM_UPDATES.search(line)
        if match is None:
            return
        loss = TRAIN_LOSS.search(line)
        if loss is not None:
            key = "valid_loss" if "valid on '" in line or "| valid |" in line or '"valid_' in line else "loss"
            self.bar.set_postfix(**{key: loss.group(1)})
        self.bar.update_to(int(next(group for group in match.groups() if group is not None)))

    def _decoding(self, line: str) -> None:
        match = HYPOTHESIS.match(line)
        if match is not None:
            self.hypotheses.add(match.group(1))
            self.bar.update_to(len(self.hypotheses))
        elif "Translated " in line:
            speed = SPEED.search(line)
            if speed is not None:
                self.bar.set_postfix(speed=f"{speed.group(1)} sent/s")

    def _fraction(self, line: str) -> None:
        match = FRACTION.match(line)
        if match is None:
            return
        label, done, total = match.group(1), int(match.group(2)), int(match.group(3))
        if label != self.fraction_label or self.bar is None:
            if self.bar is not None:  # the next label has started: this one is done
                self.bar.update_to(self.bar.total or self.bar.n)
                self.bar.close()
            prefix = f"{self.args.desc}: " if self.args.desc else ""
            self.bar = Progress(prefix + label, total, self.args.unit, self.stream, self.live, self.args.position)
            self.fraction_label = label
        self.bar.update_to(done)


def lines(stream: BinaryIO, log: BinaryIO) -> Iterator[str]:
    """Each line of ``stream`` decoded (without its newline), after writing it unchanged to ``log``."""
    for raw in stream:
        log.write(raw)
        log.flush()
        yield raw.decode("utf-8", errors="replace").rstrip("\r\n")


def parse_args(argv: Optional[list] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log", required=True, help="the file that receives every line")
    parser.add_argument("--append", action="store_true", help="append to --log instead of replacing it")
    parser.add_argument("--desc", default="", help="the bar's label, e.g. 'train transformer_mini'")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--updates", type=int, metavar="N",
                      help="training bar: N = --max-update of the run (0: unknown)")
    mode.add_argument("--sentences", type=int, metavar="N", help="decoding bar: N = sentences to decode")
    mode.add_argument("--fraction", action="store_true", help="a bar per 'label: N/M' progress line")
    mode.add_argument("--count", metavar="REGEX", help="a bar advanced by each line matching REGEX")
    parser.add_argument("--total", type=int, help="the total of the --count bar (default: unknown)")
    parser.add_argument("--unit", default="it", help="the unit of a --fraction or --count bar")
    parser.add_argument("--position", type=int, default=0,
                        help="terminal line of a live bar, counted from the cursor: one per command that runs "
                             "beside others (parallel trainings)")
    return parser.parse_args(argv)


def main(argv: Optional[list] = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # on Ctrl-C read on: the command's last lines reach the log
    live = sys.stderr.isatty()
    with open(args.log, "ab" if args.append else "wb") as log:
        console = ConsoleFilter(args, sys.stderr, live)
        try:
            for line in lines(sys.stdin.buffer, log):
                console.feed(line)
        finally:
            console.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
