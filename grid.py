"""The experiment grid: modes (or config files) x seeds x named override variants, each trained by train.py in a
subprocess (up to `jobs` at a time, `threads` each), then `analysis.py report` on the finished runs.

    python grid.py configs/grid_tiny.yaml --jobs 2 --threads 1   # train what is missing, then the report
    python grid.py configs/grid_tiny.yaml --dry-run              # each run's state and command; nothing runs
    python grid.py configs/grid_tiny.yaml --no-report            # train only

Runs go to <out>/<name>_s<seed> (name: the mode or the config file's stem, `-<variant>` for a variant other than
`default`), their output to <out>/logs/<name>_s<seed>.log (appended, one header line per start). The state of each
run directory decides what is done (runs.run_state): finished (its latest checkpoint is at the run's total steps)
-> skipped, after checking that its config.yaml still matches the grid's (the rules of --resume); started (a
checkpoint before that, e.g. a killed run) -> train.py --resume, which ends equal to an uninterrupted run; a
directory with logs but no checkpoint -> started again with --overwrite (nothing to keep); fresh -> trained. A run
that fails is reported with its exit code and log, the others go on; the report then covers the finished runs and
grid.py exits 1. Every config is resolved before anything starts, so a bad key in any run stops the grid at once.

Reports: `analysis.py report` per report group into <report.out> (default <out>/report; with several groups
<report.out>/<group>), each with runs.md (every run's last dev evaluation). Default groups: one per variant
(analysis.py groups runs by mode and seed, so a group must hold each mode once). Every reranking row reranks the
same fixed list: the subword-BM25 dev candidates each run writes (dev_candidates.trec), unless report.data names
other data (then report.candidates, one per data dir, or none: the two-stage figure).
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field, fields
from typing import Optional, Sequence

import yaml

import config
import runs
from config import ConfigError, check_rule
from model import ArgumentParser, run_cli

REPO = os.path.dirname(os.path.abspath(__file__))
NAME = re.compile(r"^[A-Za-z0-9_.+-]+(/[A-Za-z0-9_.+-]+)*$")  # run and variant names: path-safe, '/' for folders
OWNED = ("--train.seed=", "--train.out_dir=")  # the grid sets these for every run


# ------------------------------------------------------------------------------------------------ the grid YAML
@dataclass
class ReportSection:
    enabled: bool = True
    out: Optional[str] = None  # default <out>/report
    data: list[str] = field(default_factory=list)  # analysis.py --data; empty: each run's own dev set
    split: Optional[str] = None
    candidates: list[str] = field(default_factory=list)  # one per data dir ('auto' allowed); default: see above
    compare: list[list[str]] = field(default_factory=list)  # [[A, B], ...] mode pairs: analysis.py --compare A:B
    groups: dict[str, list[str]] = field(default_factory=dict)  # report name -> run names; default per variant
    args: list[str] = field(default_factory=list)  # further analysis.py report flags, e.g. [--resamples, "2000"]

    def validate(self, where: str) -> None:
        check_rule(where, "report.candidates", self.candidates, not self.candidates or
                   len(self.candidates) == len(self.data), f"one per report.data entry ({len(self.data)})")
        for i, pair in enumerate(self.compare):
            check_rule(where, f"report.compare[{i}]", pair, len(pair) == 2 and pair[0] != pair[1] and
                       all(m in config.MODES for m in pair), f"two different modes of {', '.join(config.MODES)}")
        for name in self.groups:
            check_rule(where, "report.groups", name, bool(NAME.match(name)), "names of letters, digits, _ . + -")


@dataclass
class Grid:
    out: str
    config: Optional[str] = None  # the config each of `modes` trains (with --train.mode=<mode>)
    modes: list[str] = field(default_factory=list)
    configs: list[str] = field(default_factory=list)  # config files, each run named by its stem
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5])
    overrides: dict[str, list[str]] = field(default_factory=lambda: {"default": []})  # named variants
    common: list[str] = field(default_factory=list)  # overrides of every run (before the variant's)
    jobs: int = 1
    threads: int = 1  # OMP_NUM_THREADS / MKL_NUM_THREADS of each training (torch's intra-op threads)
    report: ReportSection = field(default_factory=ReportSection)

    def validate(self, where: str) -> None:
        check_rule(where, "out", self.out, bool(self.out), "a directory")
        check_rule(where, "modes", self.modes, bool(self.modes or self.configs), "non-empty (or configs)")
        check_rule(where, "config", self.config, (self.config is not None) == bool(self.modes),
                   "given exactly when modes are")
        for i, m in enumerate(self.modes):
            check_rule(where, f"modes[{i}]", m, m in config.MODES, f"one of {', '.join(config.MODES)}")
        files = ([("config", self.config)] if self.modes else []) + [(f"configs[{i}]", c)
                                                                     for i, c in enumerate(self.configs)]
        for key, path in files:
            check_rule(where, key, path, os.path.isfile(path), "an existing config file")
        check_rule(where, "seeds", self.seeds, bool(self.seeds) and len(set(self.seeds)) == len(self.seeds),
                   "a non-empty list of different seeds")
        check_rule(where, "overrides", self.overrides, bool(self.overrides), "at least one variant")
        for v in self.overrides:
            check_rule(where, "overrides", v, bool(NAME.match(v)), "variant names of letters, digits, _ . + -")
        for name, opts in [("common", self.common)] + [(f"overrides.{k}", v) for k, v in self.overrides.items()]:
            for i, o in enumerate(opts):
                check_rule(where, f"{name}[{i}]", o, o.startswith("--") and "=" in o, "--section.key=value")
                check_rule(where, f"{name}[{i}]", o, not o.startswith(OWNED), "not train.seed or train.out_dir "
                           "(the grid sets them: seeds, out)")
        check_rule(where, "jobs", self.jobs, self.jobs >= 1, ">= 1")
        check_rule(where, "threads", self.threads, self.threads >= 1, ">= 1")
        self.report.validate(where)


def load_grid(path: str) -> Grid:
    """The grid YAML -> Grid, 1:1 (an unknown key or a wrong type is one ConfigError naming the file and key)."""
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: grid file not found")
    with open(path, "rb") as f:
        try:
            d = yaml.safe_load(f)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            raise ConfigError(f"{path}" + (f":{mark.line + 1}" if mark else "") + ": not valid YAML "
                              f"({' '.join(str(getattr(e, 'problem', None) or e).split())})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a mapping of grid keys ({', '.join(f.name for f in fields(Grid))}), "
                          f"got {type(d).__name__}")
    grid = config.from_dict(Grid, d, path)
    grid.validate(path)
    return grid


# ------------------------------------------------------------------------------------------------ the plan
@dataclass
class Kind:
    """One kind of run before seeds and variants: its name, config file and own overrides."""
    name: str
    config: str
    overrides: list


@dataclass
class Run:
    name: str  # kind[-variant]
    variant: str
    seed: int
    out_dir: str
    log: str
    command: list  # train.py's, without --resume / --overwrite
    mode: str
    state: str  # runs.run_state: fresh, empty, started, finished

    @property
    def label(self) -> str:
        return f"{self.name}_s{self.seed}"

    def argv(self) -> list:
        return self.command + {"started": ["--resume"], "empty": ["--overwrite"]}.get(self.state, [])


def grid_kinds(grid: Grid) -> list:
    """modes (on `config`, each with --train.mode) and then `configs` (named by their file's stem)."""
    kinds = [Kind(m, grid.config, [f"--train.mode={m}"]) for m in grid.modes]
    return kinds + [Kind(os.path.splitext(os.path.basename(c))[0], c, []) for c in grid.configs]


def plan(grid: Grid, where: str, kinds: Optional[Sequence[Kind]] = None) -> list:
    """Every (kind x variant x seed) as a Run with its state; every config resolved here (load_config), so a bad
    one stops the grid before anything trains; a finished run is checked against its config.yaml."""
    kinds = list(kinds) if kinds is not None else grid_kinds(grid)
    out, seen = [], set()
    for kind in kinds:
        for variant, opts in grid.overrides.items():
            name = kind.name if variant == "default" else f"{kind.name}-{variant}"
            if not NAME.match(name) or name in seen:
                raise ConfigError(f"{where}: run name {name!r} is {'used twice' if name in seen else 'not path-safe'}")
            seen.add(name)
            for seed in grid.seeds:
                out_dir = os.path.join(grid.out, f"{name}_s{seed}")
                args = kind.overrides + grid.common + opts + [f"--train.seed={seed}", f"--train.out_dir={out_dir}"]
                try:
                    cfg = config.load_config(kind.config, args)
                except ConfigError as e:
                    raise ConfigError(f"{where}: run {name}_s{seed}: {e}") from None
                state = runs.run_state(cfg)
                if state == "finished":
                    try:
                        runs.check_resume_config(cfg)
                    except ConfigError as e:
                        raise ConfigError(f"{where}: {out_dir} is finished, but the grid now asks for another "
                                          f"config ({e}); move it away to train it again") from None
                out.append(Run(name, variant, seed, out_dir, os.path.join(grid.out, "logs", f"{name}_s{seed}.log"),
                               [sys.executable, os.path.join(REPO, "train.py"), kind.config] + args,
                               cfg.train.mode, state))
    return out


def report_groups(grid: Grid, planned: list, where: str) -> list:
    """[(group name, report dir, [runs])]: report.groups (run names), else one group per variant; a group holds
    each (mode, seed) once."""
    by_name = {}
    for r in planned:
        by_name.setdefault(r.name, []).append(r)
    if grid.report.groups:
        groups = {}
        for g, names in grid.report.groups.items():
            unknown = [n for n in names if n not in by_name]
            if unknown:
                raise ConfigError(f"{where}: report.groups.{g}: unknown run {unknown[0]!r} (runs: "
                                  f"{', '.join(by_name)})")
            groups[g] = [r for n in names for r in by_name[n]]
    else:
        groups = {v: [r for r in planned if r.variant == v] for v in grid.overrides}
    for g, members in groups.items():
        modes = {}
        for r in members:
            other = modes.setdefault((r.mode, r.seed), r.name)
            if other != r.name:
                raise ConfigError(f"{where}: report group {g!r}: runs {other} and {r.name} are both mode {r.mode}; "
                                  "analysis.py groups runs by mode and seed: give report.groups")
    root = grid.report.out or os.path.join(grid.out, "report")
    one = len(groups) == 1 and not grid.report.groups
    return [(g, root if one else os.path.join(root, g), m) for g, m in groups.items()]


def report_command(grid: Grid, members: list, out: str) -> list:
    """analysis.py report over the members, into out."""
    rep, cmd = grid.report, [sys.executable, os.path.join(REPO, "analysis.py"), "report",
                             *[r.out_dir for r in members], "--out", out]
    for i, d in enumerate(rep.data):
        cmd += ["--data", d] + (["--candidates", rep.candidates[i]] if rep.candidates else [])
    if not rep.data:  # every run wrote the same fixed list of its dev set (evaluate.dev_candidates)
        cmd += ["--candidates", os.path.join(members[0].out_dir, "dev_candidates.trec")]
    if rep.split:
        cmd += ["--split", rep.split]
    for a, b in rep.compare:
        cmd += ["--compare", f"{a}:{b}"]
    return cmd + list(rep.args)


def runs_table(members: list) -> str:
    """Markdown: each run's last dev evaluation (metrics.jsonl), fixed-list reranking next to the list's own order."""
    rows = ["| run | seed | step | retrieval | rerank fixed | list | fixed - list | two-stage |",
            "|---|---|---|---|---|---|---|---|"]
    for r in members:
        path = os.path.join(r.out_dir, "metrics.jsonl")
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            m = json.loads(f.read().splitlines()[-1])
        rows.append(f"| {r.name} | {r.seed} | {m['step']} | {m['emb_ndcg@10']:.3f} | {m['fixed_ndcg@10']:.3f} | "
                    f"{m['cand_ndcg@10']:.3f} | {m['fixed_ndcg@10'] - m['cand_ndcg@10']:+.3f} | "
                    f"{m['rerank_ndcg@10']:.3f} |")
    return "\n".join(rows)


# ------------------------------------------------------------------------------------------------ running
def _quote(cmd: Sequence[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)


def run_logged(cmd: list, log: str, env: dict) -> tuple:
    """Run cmd with its output appended to log (after a header line) -> (exit code, seconds, last output line)."""
    os.makedirs(os.path.dirname(log), exist_ok=True)
    t0 = time.time()
    with open(log, "a") as f:
        f.write(f"=== {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {_quote(cmd)}\n")
        f.flush()
        code = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    with open(log, errors="replace") as f:
        lines = [x for x in f.read().splitlines() if x.strip()]
    last = next((x for x in reversed(lines) if x.startswith("done: ")), lines[-1] if lines else "")
    return code, time.time() - t0, last


def train_all(todo: list, jobs: int, env: dict) -> list:
    """Run each run's train.py, up to jobs at a time; a failure does not stop the others. -> the failed runs."""
    failed, done = [], 0

    def one(r: Run):
        return r, run_logged(r.argv(), r.log, env)

    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        for fut in concurrent.futures.as_completed([pool.submit(one, r) for r in todo]):
            r, (code, secs, last) = fut.result()
            done += 1
            if code == 0:
                print(f"[{done}/{len(todo)}] {r.label}: {r.state} -> finished ({secs:.0f} s) {last}", flush=True)
            else:
                failed.append(r)
                print(f"[{done}/{len(todo)}] {r.label}: FAILED (exit {code}, {secs:.0f} s): {last}; log: {r.log}",
                      flush=True)
    return failed


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = ArgumentParser(prog="grid.py", description=__doc__.split("\n\n")[0])
    p.add_argument("grid", metavar="GRID.yaml")
    p.add_argument("--jobs", type=int, default=None, help="trainings at a time (default: the grid's jobs)")
    p.add_argument("--threads", type=int, default=None, help="threads per training (default: the grid's threads)")
    p.add_argument("--dry-run", action="store_true", help="print each run's state and command, run nothing")
    p.add_argument("--no-report", action="store_true", help="train only")
    a = p.parse_args(argv)
    for flag, v in (("--jobs", a.jobs), ("--threads", a.threads)):
        check_rule(a.grid, flag, v, v is None or v >= 1, ">= 1")
    grid = load_grid(a.grid)
    grid.jobs = grid.jobs if a.jobs is None else a.jobs
    grid.threads = grid.threads if a.threads is None else a.threads
    return run_grid(grid, a.grid, dry_run=a.dry_run, report=grid.report.enabled and not a.no_report)


def run_grid(grid: Grid, where: str, kinds: Optional[Sequence[Kind]] = None, dry_run: bool = False,
             report: bool = True) -> int:
    """Plan, train what is not finished, then the reports (see the module docstring). -> exit code (1: a run or a
    report failed)."""
    t0 = time.time()
    planned = plan(grid, where, kinds)
    groups = report_groups(grid, planned, where)
    todo = [r for r in planned if r.state != "finished"]
    print(f"grid {where}: {len(planned)} runs, {len(planned) - len(todo)} finished (skipped), "
          f"{sum(r.state == 'started' for r in todo)} to resume, {sum(r.state != 'started' for r in todo)} to train; "
          f"{grid.jobs} at a time, {grid.threads} thread(s) each", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(grid.threads), "MKL_NUM_THREADS": str(grid.threads)}
    if dry_run:
        for r in planned:
            print(f"{r.label}: {r.state}" + ("" if r.state == "finished" else f": {_quote(r.argv())}"))
        for _, out, members in groups:
            print(f"report {out}: {_quote(report_command(grid, members, out))}")
        return 0
    failed = train_all(todo, grid.jobs, env)
    t_train = time.time() - t0
    code = 1 if failed else 0
    for name, out, members in groups if report else ():
        members = [r for r in members if r not in failed]
        if not members:
            continue
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "runs.md"), "w") as f:
            f.write(runs_table(members) + "\n")
        cmd = report_command(grid, members, out)
        log = os.path.join(grid.out, "logs", f"report-{name.replace('/', '_')}.log")
        rc, secs, _ = run_logged(cmd, log, env)
        print(f"report {out}/report.md ({secs:.0f} s)" if rc == 0 else
              f"report {out}: FAILED (exit {rc}); log: {log}", flush=True)
        code = code or (1 if rc else 0)
    print(f"grid {where}: {len(todo) - len(failed)} trained or resumed, {len(planned) - len(todo)} skipped, "
          f"{len(failed)} failed" + "".join(f"\n  failed: {r.label}, log {r.log}" for r in failed) +
          f"; training {t_train:.0f} s, in all {time.time() - t0:.0f} s", flush=True)
    return code


def cli(argv: Optional[Sequence[str]] = None) -> int:
    """`python grid.py ...` through the CLIs' one error path (model.run_cli): a bad grid or run config is one line,
    exit code 2."""
    return run_cli("grid.py", main, argv)


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
