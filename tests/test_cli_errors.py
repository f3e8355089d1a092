"""Every CLI answers bad input with one line: the catalogue of bad inputs, each with its expected message.

Each case runs a CLI entry point (train.cli, evaluate.cli, analysis.cli, data.cli, synthetic.cli: model.run_cli around the
module's main) in-process and must give exit code 2, exactly one line on stderr `<prog>: error: <message>` that
matches the case's regex, no traceback, and leave an existing run directory byte-identical. The config cases
point train.out_dir at that run directory, so a check that came after anything was written would show up as
a changed file. A few real subprocesses prove the exit code and the absence of a traceback end to end.

Placeholders in a case's argv and files: {task} the synthetic BEIR folder, {run} the existing 2-step run, {cfg}
a valid config whose out_dir is {run}, {tmp} the case's own empty directory, {bad} a copy of {task} with the
case's `edit` (file, line number, new line) applied.
"""
import hashlib
import os
import re
import shutil
import subprocess
import sys

import pytest

import analysis
import data
import evaluate
import export
import grid
import synthetic
import tiny_setup
import train
from config import ConfigError
from model import run_cli


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Tiny tensors run on one thread (conftest.one_thread)."""


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """{task, run, cfg}: the synthetic task and a finished 2-step tiny run whose config is {cfg}."""
    root = tmp_path_factory.mktemp("cli")
    task = tiny_setup.write_synthetic(str(root / "synthetic"))
    cfg, run = tiny_setup.finished_run(str(root), task)
    return {"task": task, "run": run, "cfg": cfg}


def tree_digest(path: str) -> dict:
    """{relative path: sha256 of the file, or 'dir'} of everything under path."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), path)] = "dir"
        for f in filenames:
            with open(os.path.join(dirpath, f), "rb") as fh:
                out[os.path.relpath(os.path.join(dirpath, f), path)] = hashlib.sha256(fh.read()).hexdigest()
    return out


CLIS = {"train": train.cli, "evaluate": evaluate.cli, "analysis": analysis.cli, "data": data.cli,
        "synthetic": synthetic.cli, "export": export.cli, "grid": grid.cli}
RUN_FILE = {"run.trec": "q00000 Q0 d00001 1 1.0 tag\n"}  # a TREC run, as evaluate.py writes it

CYCLE_A, CYCLE_B = "base: b.yaml\n", "base: a.yaml\n"
BAD_TRAIN_LINE = '{"query": "cut off'

# an extension of {run} (extend.py), its NLI files in {tmp}/nli
EXT = "extend: {{from_run: {{run}}, data_dir: {{tmp}}/nli{more}}}\ntrain: {{out_dir: {{tmp}}/ext}}\n"
NLI_OK = '{"premise": "a b", "hypothesis": "a", "label": "entailment"}\n'
NLI_FILES = {"nli/train.jsonl": NLI_OK * 4, "nli/dev.jsonl": NLI_OK}

# (name, cli, argv, files {name: text} written to {tmp}, edit of {bad} or None, message regex)
CASES = [
    # ---- train.py: an extension (extend: a new expert on {run})
    ("train/extend-with-a-model-section", "train", ["{tmp}/ext.yaml"],
     {"ext.yaml": EXT.format(more="") + "model: {dtype: float32}\n", **NLI_FILES}, None,
     r"ext\.yaml: model: an extension takes model, data, adapters and router from extend\.from_run"),
    ("train/extend-sets-train-mode", "train", ["{tmp}/ext.yaml", "--train.mode=hard_switch"],
     {"ext.yaml": EXT.format(more=""), **NLI_FILES}, None, r"train\.mode: comes from extend\.from_run's config"),
    ("train/extend-from-run-missing", "train", ["{tmp}/ext.yaml", "--extend.from_run={tmp}/nowhere"],
     {"ext.yaml": EXT.format(more=""), **NLI_FILES}, None, r"extend\.from_run '.*nowhere': not a run or checkpoint"),
    ("train/extend-expert-name-taken", "train", ["{tmp}/ext.yaml"],
     {"ext.yaml": EXT.format(more=", expert: {name: shared}"), **NLI_FILES}, None,
     r"extend\.expert\.name must be a new expert name \(the run has embed, rerank, shared\)"),
    ("train/extend-unknown-key", "train", ["{tmp}/ext.yaml"], {"ext.yaml": EXT.format(more=", rooter: grow"),
                                                                **NLI_FILES}, None,
     r"extend: unknown key 'rooter' \(known keys: from_run"),
    ("train/extend-router-bad-choice", "train", ["{tmp}/ext.yaml", "--extend.router=thaw"],
     {"ext.yaml": EXT.format(more=""), **NLI_FILES}, None, r"extend\.router: 'thaw' is not one of 'freeze', 'grow'"),
    ("train/extend-nli-file-missing", "train", ["{tmp}/ext.yaml"], {"ext.yaml": EXT.format(more="")}, None,
     r"extend\.data_dir: .*nli/train\.jsonl not found"),
    ("train/extend-nli-line-malformed", "train", ["{tmp}/ext.yaml"],
     {"ext.yaml": EXT.format(more=""), "nli/train.jsonl": NLI_OK + '{"premise": "a", "label": "neutral"}\n',
      "nli/dev.jsonl": NLI_OK}, None, r"nli/train\.jsonl:2: missing \"hypothesis\""),
    # ---- train.py: the command line and the config file
    ("train/no-arguments", "train", [], {}, None, r"usage: python train\.py CONFIG\.yaml"),
    ("train/missing-config-file", "train", ["{tmp}/nowhere.yaml"], {}, None, r"nowhere\.yaml: config file not found"),
    ("train/override-without-value", "train", ["{cfg}", "--train.lr"], {}, None,
     r"override '--train\.lr': expected --section\.key=value"),
    ("train/misspelt-flag", "train", ["{cfg}", "--resum"], {}, None, r"override '--resum': expected --section\.key"),
    ("train/override-empty-key", "train", ["{cfg}", "--train.=1"], {}, None, r"override '--train\.=1': empty key"),
    ("train/override-bad-yaml", "train", ["{cfg}", "--train.lr=[1"], {}, None,
     r"override '--train\.lr=\[1':1:\d+: not valid YAML"),
    ("train/yaml-syntax-error", "train", ["{tmp}/bad.yaml"], {"bad.yaml": "train:\n  lr: [1\n"}, None,
     r"bad\.yaml:3:1: not valid YAML \(expected ',' or ']'"),
    ("train/python-tag-refused", "train", ["{tmp}/tag.yaml"], {"tag.yaml": "train: !!python/object:os.system {}\n"},
     None, r"tag\.yaml:1:8: not valid YAML \(could not determine a constructor for the tag .*python/object"),
    ("train/empty-config-file", "train", ["{tmp}/empty.yaml"], {"empty.yaml": "# nothing\n"}, None,
     r"empty\.yaml: the config file is empty \(expected a mapping of sections: model, data"),
    ("train/top-level-not-a-mapping", "train", ["{tmp}/list.yaml"], {"list.yaml": "- train\n"}, None,
     r"list\.yaml: the top level must be a mapping of sections, got list"),
    ("train/base-cycle", "train", ["{tmp}/a.yaml"], {"a.yaml": CYCLE_A, "b.yaml": CYCLE_B}, None,
     r"b\.yaml: base: .*a\.yaml closes a cycle .*a\.yaml -> .*b\.yaml -> .*a\.yaml$"),
    ("train/base-names-itself", "train", ["{tmp}/self.yaml"], {"self.yaml": "base: self.yaml\n"}, None,
     r"self\.yaml: base: .*self\.yaml closes a cycle .*self\.yaml -> .*self\.yaml$"),
    ("train/base-missing", "train", ["{tmp}/c.yaml"], {"c.yaml": "base: gone.yaml\n"}, None,
     r"gone\.yaml: config file not found \(base: of .*c\.yaml\)"),
    ("train/unknown-key", "train", ["{cfg}", "--train.nosuchkey=1"], {}, None,
     r"cfg\.yaml \(with overrides\): train: unknown key 'nosuchkey' \(known keys: mode, out_dir"),
    ("train/unknown-section", "train", ["{cfg}", "--trian.lr=1"], {}, None, r"unknown key 'trian' \(known keys: model"),
    ("train/wrong-type", "train", ["{cfg}", "--train.lr=abc"], {}, None, r"train\.lr: expected float, got 'abc'"),
    ("train/float-for-int", "train", ["{cfg}", "--train.steps=1.5"], {}, None, r"train\.steps: expected int, got 1\.5"),
    ("train/bad-choice", "train", ["{cfg}", "--train.mode=banana"], {}, None,
     r"train\.mode: 'banana' is not one of 'emb_only', 'rank_only'"),
    ("train/bad-device", "train", ["{cfg}", "--train.device=tpu"], {}, None, r"train\.device: 'tpu' is not one of"),
    ("train/router-fn-unknown", "train", ["{cfg}", "--router.fn=sparsegenx"], {}, None,
     r"cfg\.yaml \(with overrides\): router\.fn: must be one of softmax, topk.* \(got 'sparsegenx'\)"),
    ("train/router-top-k-0", "train", ["{cfg}", "--router.top_k=0"], {}, None,
     r"router\.top_k: must be >= 1 \(got 0\)"),
    # ---- train.py: values outside their range
    ("train/max-doc-len-0", "train", ["{cfg}", "--data.max_doc_len=0"], {}, None,
     r"data\.max_doc_len must be >= 2 \(one text token \+ EOS with data\.append_eos\) \(got 0\)"),
    ("train/max-query-len-negative", "train", ["{cfg}", "--data.max_query_len=-3"], {}, None,
     r"data\.max_query_len must be >= 2 .*\(got -3\)"),
    ("train/max-doc-len-0-without-eos", "train", ["{cfg}", "--data.max_doc_len=0", "--data.append_eos=false"], {},
     None, r"data\.max_doc_len must be >= 1 \(got 0\)"),
    ("train/max-query-len-below-instruction", "train", ["{cfg}", "--data.max_query_len=3"], {}, None,
     r"data\.max_query_len must be > \d+, the tokens of the query template with data\.embed_instruction and the "
     r"EOS \(got 3\)"),
    ("train/max-pair-len-below-template", "train", ["{cfg}", "--data.max_pair_len=10"], {}, None,
     r"data\.max_pair_len must be > \d+, the tokens of the reranker template with data\.rerank_instruction "
     r"\(got 10\)"),
    ("train/warmup-negative", "train", ["{cfg}", "--train.warmup_steps=-5"], {}, None,
     r"train\.warmup_steps must be >= 0 \(got -5\)"),
    ("train/dev-queries-negative", "train", ["{cfg}", "--data.dev_queries=-1"], {}, None,
     r"data\.dev_queries must be >= 0 \(got -1\)"),
    ("train/dev-corpus-negative", "train", ["{cfg}", "--data.dev_corpus=-2"], {}, None,
     r"data\.dev_corpus must be >= 0"),
    ("train/n-neg-negative", "train", ["{cfg}", "--data.n_neg=-1"], {}, None, r"data\.n_neg must be >= 0 \(got -1\)"),
    ("train/lr-zero", "train", ["{cfg}", "--train.lr=0"], {}, None, r"train\.lr must be > 0 \(got 0\.0\)"),
    ("train/lr-nan", "train", ["{cfg}", "--train.lr=.nan"], {}, None, r"train\.lr: expected a finite number, got nan"),
    ("train/lr-inf", "train", ["{cfg}", "--train.lr=.inf"], {}, None, r"train\.lr: expected a finite number, got inf"),
    ("train/batch-size-0", "train", ["{cfg}", "--train.batch_size=0"], {}, None, r"train\.batch_size must be >= 1"),
    ("train/batch-not-divisible", "train", ["{cfg}", "--train.grad_accum=3"], {}, None,
     r"train\.batch_size must be a multiple of train\.grad_accum 3 \(got 4\)"),
    ("train/temperature-0", "train", ["{cfg}", "--train.temperature=0"], {}, None, r"train\.temperature must be > 0"),
    ("train/min-lr-ratio-2", "train", ["{cfg}", "--train.min_lr_ratio=2"], {}, None,
     r"train\.min_lr_ratio must be in \[0, 1\] \(got 2\.0\)"),
    ("train/clip-0", "train", ["{cfg}", "--train.clip=0"], {}, None, r"train\.clip must be > 0"),
    ("train/seed-negative", "train", ["{cfg}", "--train.seed=-1"], {}, None,
     r"train\.seed must be in \[0, 4294967295\]"),
    ("train/out-dir-empty", "train", ["{cfg}", "--train.out_dir=''"], {}, None,
     r"train\.out_dir must be a non-empty string \(got ''\)"),
    ("train/freeze-unknown-expert", "train", ["{cfg}", "--train.freeze_experts=[nosuch]"], {}, None,
     r"train\.freeze_experts must be an expert of mode joint_moe \(embed, rerank, shared\) \(got 'nosuch'\)"),
    ("train/stage-freeze-unknown-expert", "train", ["{cfg}", "--train.stages=[{steps: 1, freeze_experts: [shared]}]",
                                                   "--train.mode=no_shared"], {}, None,
     r"train\.stages\[0\]\.freeze_experts must be an expert of mode no_shared \(embed, rerank\) \(got 'shared'\)"),
    ("train/stage-steps-0", "train", ["{cfg}", "--train.stages=[{steps: 0}]"], {}, None,
     r"train\.stages\[0\]\.steps must be >= 1 \(got 0\)"),
    ("train/stage-task-the-mode-lacks", "train", ["{cfg}", "--train.mode=rank_only",
                                                 "--train.stages=[{steps: 1, tasks: embed}]"], {}, None,
     r"train\.stages\[0\]\.tasks must be 'both' or a task mode rank_only trains \(rerank\) \(got 'embed'\)"),
    ("train/router-kind-contradicts-mode", "train", ["{cfg}", "--router.kind=task"], {}, None,
     r"router\.kind 'task' contradicts train\.mode 'joint_moe', which routes with 'learned' or 'retriever'"),
    ("train/router-aux-losses-not-a-setting", "train", ["{cfg}", "--router.aux_losses=[z_loss]"], {}, None,
     r"router\.aux_losses \['z_loss'\] is not a setting: .* train\.aux_weights"),
    ("train/aux-loss-unknown", "train", ["{cfg}", "--train.aux_weights={nosuch: 1}"], {}, None,
     r"train\.aux_weights\.nosuch must be an aux loss among load_balance, z_loss, entropy"),
    ("train/aux-weight-negative", "train", ["{cfg}", "--train.aux_weights={load_balance: -1}"], {}, None,
     r"train\.aux_weights\.load_balance must be >= 0 \(got -1\.0\)"),
    ("train/no-loss-weight", "train", ["{cfg}", "--train.emb_weight=0", "--train.rank_weight=0"], {}, None,
     r"train\.emb_weight/rank_weight must be > 0 for at least one task"),
    ("train/rank-0", "train", ["{cfg}", "--adapters.r=0"], {}, None, r"adapters\.r must be >= 1 \(got 0\)"),
    ("train/unknown-target", "train", ["{cfg}", "--adapters.targets=[qq]"], {}, None,
     r"adapters\.targets must be a non-empty list of distinct names among q, k, v, o, gate, up, down"),
    ("train/no-targets", "train", ["{cfg}", "--adapters.targets=[]"], {}, None,
     r"adapters\.targets must be .*\(got \[\]\)"),
    ("train/dropout-1.5", "train", ["{cfg}", "--adapters.dropout=1.5"], {}, None,
     r"adapters\.dropout must be in \[0, 1\) \(got 1\.5\)"),
    ("train/layer-beyond-depth", "train", ["{cfg}", "--adapters.layers=[5]"], {}, None,
     r"adapters\.layers must be layer indices < model\.tiny\.num_hidden_layers 1 \(got \[5\]\)"),
    ("train/kv-heads-not-a-divisor", "train", ["{cfg}", "--model.tiny.num_key_value_heads=3"], {}, None,
     r"model\.tiny\.num_key_value_heads must be a divisor of num_attention_heads 2"),
    ("train/odd-head-dim", "train", ["{cfg}", "--model.tiny.head_dim=15"], {}, None,
     r"model\.tiny\.head_dim must be even"),
    ("train/first-pooling-causal", "train", ["{cfg}", "--train.pooling=first"], {}, None,
     r"train\.pooling 'first' sees only the first token under causal attention"),
    # ---- train.py: what the run reads, checked before anything is written
    ("train/data-dir-empty", "train", ["{cfg}", "--data.dir=''"], {}, None, r"data\.dir must be a non-empty string"),
    ("train/data-dir-missing", "train", ["{cfg}", "--data.dir={tmp}/nowhere"], {}, None,
     r"data\.dir '.*nowhere': directory not found \(data\.synthetic: true writes"),
    ("train/dev-split-missing", "train", ["{cfg}", "--data.dev_split=nosuch"], {}, None,
     r"data\.dev_split: .*qrels/nosuch\.tsv not found"),
    ("train/train-file-missing", "train", ["{cfg}", "--data.train_file={tmp}/gone.jsonl"], {}, None,
     r"data\.train_file: .*gone\.jsonl not found"),
    ("train/model-path-missing", "train", ["{cfg}", "--model.path={tmp}/nomodel"], {}, None,
     r"model\.path '.*nomodel': not a model directory \(no config\.json\)"),
    ("train/fresh-run-into-existing-run", "train", ["{cfg}"], {}, None,
     r"already holds a run; pass --resume to continue it, --overwrite to delete it, .*\(nothing was changed; found: "),
    ("train/resume-without-checkpoint", "train", ["{cfg}", "--resume", "--train.out_dir={tmp}/none"], {}, None,
     r"--resume: .*none has no checkpoint"),
    ("train/malformed-training-line", "train",
     ["{cfg}", "--train.out_dir={tmp}/fresh", "--data.train_file={tmp}/t.jsonl"],
     {"t.jsonl": '{"query": "q", "pos": ["p"], "neg": ["n"]}\n' + BAD_TRAIN_LINE + "\n"}, None,
     r"t\.jsonl:2: invalid JSON"),
    # ---- evaluate.py
    ("evaluate/missing-checkpoint", "evaluate", ["{tmp}/nowhere"], {}, None, r"nowhere: checkpoint not found"),
    ("evaluate/checkpoint-is-a-file", "evaluate", ["{cfg}"], {}, None, r"cfg\.yaml: not a directory"),
    ("evaluate/missing-data-dir", "evaluate", ["{run}", "--data", "{tmp}/nowhere"], {}, None,
     r"nowhere: data directory not found"),
    ("evaluate/missing-split", "evaluate", ["{run}", "--data", "{task}", "--split", "nosuch"], {}, None,
     r"qrels/nosuch\.tsv: file not found"),
    ("evaluate/malformed-corpus-line", "evaluate", ["{run}", "--data", "{bad}"], {}, ("corpus.jsonl", 2, '{"_id": '),
     r"corpus\.jsonl:2: invalid JSON"),
    ("evaluate/query-without-id", "evaluate", ["{run}", "--data", "{bad}"], {}, ("queries.jsonl", 1, '{"text": "x"}'),
     r'queries\.jsonl:1: missing "_id"'),
    ("evaluate/duplicate-doc-id", "evaluate", ["{run}", "--data", "{bad}"], {},
     ("corpus.jsonl", 2, '{"_id": "d00000", "text": "again"}'),
      r"corpus\.jsonl:2: duplicate _id 'd00000' \(first at line 1\)"),
    ("evaluate/non-integer-qrels-score", "evaluate", ["{run}", "--data", "{bad}"], {},
     ("qrels/test.tsv", 2, "q00216\td00001\thigh"), r"test\.tsv:2: score must be an integer, got 'high'"),
    ("evaluate/k-rerank-0", "evaluate", ["{run}", "--k-rerank", "0"], {}, None,
     r"k_rerank must be a positive integer, got 0"),
    ("evaluate/k-rerank-not-a-number", "evaluate", ["{run}", "--k-rerank", "abc"], {}, None,
     r"argument --k-rerank: invalid int value: 'abc' \(see evaluate\.py --help\)"),
    ("evaluate/max-queries-0", "evaluate", ["{run}", "--max-queries", "0"], {}, None,
     r"max_queries must be a positive"),
    ("evaluate/batch-size-0", "evaluate", ["{run}", "--batch-size", "0"], {}, None, r"batch_size must be >= 1, got 0"),
    ("evaluate/max-doc-len-0", "evaluate", ["{run}", "--max-doc-len", "0"], {}, None,
     r"max_doc_len must be >= 1, got 0"),
    ("evaluate/drop-self-bad-choice", "evaluate", ["{run}", "--drop-self", "maybe"], {}, None,
     r"argument --drop-self: invalid choice: 'maybe' \(choose from '?auto'?, '?on'?, '?off'?\)"),
    ("evaluate/bad-index", "evaluate", ["{run}", "--index", "annoy"], {}, None,
     r"argument --index: invalid choice: 'annoy'"),
    ("evaluate/unknown-option", "evaluate", ["{run}", "--bogus"], {}, None, r"unrecognized arguments: --bogus"),
    ("evaluate/override-on-a-run", "evaluate", ["{run}", "--data.max_doc_len=5"], {}, None,
     r"override .--data\.max_doc_len=5.: a trained run takes only the deployment settings --model\.dtype"),
    ("evaluate/missing-candidates", "evaluate", ["{run}", "--candidates", "{tmp}/bm25.trec"], {}, None,
     r"bm25\.trec: candidate run file not found"),
    ("evaluate/malformed-candidates", "evaluate", ["{run}", "--candidates", "{tmp}/c.trec"],
     {"c.trec": "q00200 Q0 d00001 1 3.5\n"}, None,
     r"c\.trec:1: expected 6 fields 'qid Q0 docid rank score tag', got 5"),
    # ---- analysis.py
    ("analysis/no-command", "analysis", [], {}, None, r"the following arguments are required: cmd"),
    ("analysis/unknown-command", "analysis", ["plots", "{run}"], {}, None, r"argument cmd: invalid choice: 'plots'"),
    ("analysis/missing-checkpoint", "analysis", ["routing", "{tmp}/nowhere"], {}, None,
     r"nowhere: no checkpoint here \(neither adapters\.safetensors nor a 'latest' file\)"),
    ("analysis/n-0", "analysis", ["routing", "{run}", "--n", "0"], {}, None, r"--n must be >= 1 \(got 0\)"),
    ("analysis/same-run-twice", "analysis", ["routing", "{run}", "{run}"], {}, None,
     r"are both mode joint_moe seed 0; give one run per \(mode, seed\)"),
    ("analysis/candidates-per-data", "analysis", ["interference", "{run}", "--data", "{task}", "--candidates", "a",
                                                  "--candidates", "b"], {}, None,
                                                  r"--candidates: give one per --data \(2 for 1\)"),
    ("analysis/missing-data-dir", "analysis", ["routing", "{run}", "--data", "{tmp}/nowhere"], {}, None,
     r"nowhere: data directory not found"),
    # ---- data.py
    ("data/no-command", "data", [], {}, None, r"the following arguments are required: command"),
    ("synthetic/seed-not-a-number", "synthetic", ["{tmp}/out", "--seed", "abc"], {}, None,
     r"argument --seed: invalid int value: 'abc'"),
    ("data/mine-missing-run", "data", ["mine", "{tmp}/nowhere.trec", "{task}", "{tmp}/out.jsonl"], {}, None,
     r"nowhere\.trec: run file not found"),
    ("data/mine-missing-qrels", "data", ["mine", "{tmp}/run.trec", "{tmp}/nodata", "{tmp}/out.jsonl"], RUN_FILE,
     None, r"nodata/qrels/train\.tsv: file not found"),
    ("data/mine-bad-window", "data", ["mine", "{tmp}/run.trec", "{task}", "{tmp}/out.jsonl", "--window", "5", "2"],
     RUN_FILE, None, r"mine: --window FROM TO needs 0 <= FROM < TO \(got 5 2\)$"),
    ("data/mine-n-neg-0", "data", ["mine", "{tmp}/run.trec", "{task}", "{tmp}/out.jsonl", "--n-neg", "0"], RUN_FILE,
     None,
     r"mine: --n-neg must be >= 1 \(got 0\)$"),
    # ---- export.py
    ("export/no-task", "export", ["{run}", "{tmp}/out"], {}, None, r"the following arguments are required: --task"),
    ("export/missing-checkpoint", "export", ["{tmp}/nowhere", "{tmp}/out", "--task", "embed"], {}, None,
     r"nowhere: no checkpoint here"),
    ("export/learned-router", "export", ["{run}", "{tmp}/out", "--task", "embed"], {}, None,
     r"router\.kind 'learned' \(train\.mode 'joint_moe'\)"),
    ("analysis/compare-not-a-pair", "analysis", ["interference", "{run}", "--compare", "joint_moe"], {}, None,
     r"--compare 'joint_moe': expected A:B, two different modes of emb_only, "),
    ("analysis/alpha-out-of-range", "analysis", ["report", "{run}", "--alpha", "1.5"], {}, None,
     r"--alpha must be in \(0, 1\) \(got 1\.5\)$"),
    # ---- grid.py (the grid YAML; a run's config errors: tests/test_grid.py)
    ("grid/missing-file", "grid", ["{tmp}/nowhere.yaml"], {}, None, r"nowhere\.yaml: grid file not found$"),
    ("grid/unknown-key", "grid", ["{tmp}/g.yaml"], {"g.yaml": "out: o\nsedes: [1]\n"}, None,
     r"g\.yaml: unknown key 'sedes' \(known keys: out, config, modes,"),
    ("grid/unknown-report-key", "grid", ["{tmp}/g.yaml"], {"g.yaml": "out: o\nreport: {dta: [x]}\n"}, None,
     r"g\.yaml: report: unknown key 'dta'"),
    ("grid/unknown-mode", "grid", ["{tmp}/g.yaml"], {"g.yaml": "out: o\nconfig: c.yaml\nmodes: [joint_moee]\n"},
     None, r"g\.yaml: modes\[0\] must be one of emb_only, .* \(got 'joint_moee'\)$"),
    ("grid/seeds-not-ints", "grid", ["{tmp}/g.yaml"], {"g.yaml": "out: o\nseeds: [1, a]\n"}, None,
     r"g\.yaml: seeds\[1\]: expected int, got 'a'$"),
    ("grid/jobs-zero", "grid", ["{tmp}/g.yaml", "--jobs", "0"], {"g.yaml": "out: o\n"}, None,
     r"g\.yaml: --jobs must be >= 1 \(got 0\)$"),
    ("grid/yaml-syntax-error", "grid", ["{tmp}/g.yaml"], {"g.yaml": "out: [o\n"}, None, r"g\.yaml:2: not valid YAML"),
    ("grid/not-a-mapping", "grid", ["{tmp}/g.yaml"], {"g.yaml": "- out\n"}, None,
     r"g\.yaml: expected a mapping of grid keys \(out, .*\), got list$"),
]


def fill(text: str, places: dict) -> str:
    """The placeholders replaced (not str.format: YAML flow mappings in overrides have braces too)."""
    for key, value in places.items():
        text = text.replace("{" + key + "}", value)
    return text


def bad_copy(task: str, dest: str, edit: tuple) -> str:
    """A copy of the task folder with line `lineno` (1-based, header included) of `name` replaced."""
    name, lineno, line = edit
    shutil.copytree(task, dest)
    path = os.path.join(dest, name)
    lines = open(path, encoding="utf-8").read().splitlines()
    lines[lineno - 1] = line
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return dest


@pytest.mark.parametrize("name,cli,argv,files,edit,message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_with_exit_code_2_and_leaves_the_run_untouched(env, tmp_path, capsys, name, cli, argv,
                                                                           files, edit, message):
    places = {**env, "tmp": str(tmp_path)}
    if edit is not None:
        places["bad"] = bad_copy(env["task"], str(tmp_path / "bad"), edit)
    for fname, text in files.items():
        (tmp_path / fname).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / fname).write_text(fill(text, places))
    before = tree_digest(env["run"])
    capsys.readouterr()
    assert CLIS[cli]([fill(a, places) for a in argv]) == 2
    out, err = capsys.readouterr()
    prog = f"{cli}.py"
    assert err.startswith(f"{prog}: error: ") and err.count("\n") == 1, err
    assert re.search(message, err.rstrip("\n")), err
    assert "Traceback" not in err and out == ""
    assert tree_digest(env["run"]) == before


def test_the_catalogue_covers_every_cli_with_more_than_40_cases():
    assert len(CASES) > 40 and {c[1] for c in CASES} == set(CLIS)
    assert len({c[0] for c in CASES}) == len(CASES)


def test_debug_shows_the_traceback_of_an_input_error(env, tmp_path):
    with pytest.raises(ConfigError, match=r"train\.warmup_steps must be >= 0"):
        train.cli([env["cfg"], "--train.warmup_steps=-5", "--debug"])


def test_a_bug_is_not_an_input_error_and_keeps_its_traceback():
    def buggy(argv):
        return {}["missing"]  # a KeyError: no project error is one

    with pytest.raises(KeyError):
        run_cli("x.py", buggy, [])


def test_a_config_error_stops_before_the_out_dir_is_created(env, tmp_path):
    out = tmp_path / "new_run"
    assert train.cli([env["cfg"], f"--train.out_dir={out}", "--data.max_pair_len=10"]) == 2
    assert not out.exists()


# --------------------------------------------------------------------------------------------- real processes
SUBPROCESS_CASES = [
    ("train.py", ["{tmp}/nowhere.yaml"], r"^train\.py: error: .*nowhere\.yaml: config file not found\n$"),
    ("train.py", ["{cfg}", "--router.fn=sparsegenx"], r"^train\.py: error: .*router\.fn: must be one of"),
    ("evaluate.py", ["{tmp}/nowhere"], r"^evaluate\.py: error: .*nowhere: checkpoint not found\n$"),
    ("analysis.py", ["routing", "{tmp}/nowhere"], r"^analysis\.py: error: .*nowhere: no checkpoint here"),
    ("synthetic.py", [], r"^synthetic\.py: error: the following arguments are required: out_dir"),
]


@pytest.mark.parametrize("script,argv,message", SUBPROCESS_CASES, ids=[f"{c[0]}-{i}" for i, c in
                                                                       enumerate(SUBPROCESS_CASES)])
def test_a_real_process_exits_2_with_one_line_and_no_traceback(env, tmp_path, script, argv, message):
    places = {**env, "tmp": str(tmp_path)}
    res = subprocess.run([sys.executable, os.path.join(tiny_setup.REPO, script)] + [fill(a, places) for a in argv],
                         capture_output=True, text=True, env=tiny_setup.SUBPROCESS_ENV, timeout=120)
    assert res.returncode == 2, res.stderr
    assert re.search(message, res.stderr) and res.stderr.count("\n") == 1, res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""
