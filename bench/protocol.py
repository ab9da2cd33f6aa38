"""Paper protocols: the evaluation behind one paper table, runnable by name.

A protocol is data (``suites/protocols/NAME.yaml``, or a plugin in the ``bench.protocols``
entry-point group) that fixes what a paper's table was measured with:

- ``suites``: each suite evaluated, with the suite keys the paper fixes (e.g. the Pick-a-Pic v2
  prompt set: ``{prompts: {hub: yuvalkirstain/pickapic_v2_no_images}}``);
- ``images_per_prompt``, ``seeds`` (the base seeds averaged), ``metrics`` (names pin the scorer
  versions: ``hpsv2`` is HPS v2.0, ``hpsv2.1`` v2.1);
- ``variants``: the sampler settings per model (``{name, steps, guidance}``; ``default`` for any
  model not listed), e.g. SDXL-Turbo at 4 and at 1 step;
- ``per_subject``: one training and evaluation per subject of a DreamBench suite;
- ``checkpoint``: ``{select: final}``, or ``{select: lowest|highest, metric: M}``: every snapshot
  the training keeps (``train.keep_checkpoints``, one per ``train.save_every`` steps, and the final
  weights) is evaluated and the one with the lowest (highest) M is the protocol's result;
- ``expressible`` (true, partly, false) and ``limits``: what the harness does not reproduce.

``bench run protocol=NAME method=M`` trains once (once per subject) and evaluates the base model and
the trained one in every cell (suite x variant x seed [x subject]); ``bench eval protocol=NAME
model=X`` evaluates the base model only. Each run's manifest records the protocol and its cell
(``protocol``), which ``bench leaderboard papers=true`` matches with the papers' numbers.
Command-line overrides go on top of every cell (``suite.limit=2 scorers=tiny``);
``protocol.suites.NAME.KEY=VALUE`` sets a suite key for one suite's cells (its local ``source``),
``protocol.model=NAME`` evaluates a stand-in model with NAME's variants and records it as NAME.
"""

from __future__ import annotations

import json
import logging

from bench.errors import UsageError

log = logging.getLogger(__name__)
SELECT = ("final", "lowest", "highest")
EXPRESSIBLE = (True, "partly", False)
# What a protocol fixes: overriding it on the command line would make a run's recorded cell untrue.
FIXED = ("suite", "seed", "gen.steps", "gen.guidance", "suite.images_per_prompt", "suite.metrics")
# Arguments that say where things are or how fast they go, not what is measured: left out of a run's recorded overrides.
PLACE = ("protocol", "method", "model", "out", "cache_dir", "device", "scorers", "gen.batch_size", "score.batch_size", "suite.source")


def overrides_of(args: list[str]) -> list[str]:
    """The command-line settings a protocol run adds to its preset (``train.steps=2``, ``suite.limit=2``):
    recorded in each manifest and shown beside the paper's numbers, so a smoke run never passes for the preset."""
    from bench.config import parse_overrides

    out = []
    for key, value in parse_overrides(args):
        if key in PLACE or key.startswith("protocol.suites.") and key.endswith(".source") or key == "protocol.model":
            continue
        out.append(f"{key}={value}")
    return out


def validate(p: dict) -> dict:
    """Check a protocol's fields; every problem is one line naming the protocol and the field."""
    name = p.get("name", "?")

    def bad(msg):
        raise UsageError(f"protocol '{name}': {msg}")

    for key in ("description", "suites", "images_per_prompt", "seeds", "metrics", "variants", "checkpoint", "expressible"):
        if key not in p:
            bad(f"missing '{key}'")
    if p["expressible"] not in EXPRESSIBLE:
        bad(f"expressible must be true, partly or false, got {p['expressible']!r}")
    if p["expressible"] is not True and not p.get("limits"):
        bad("a protocol that is not fully expressible lists why under 'limits'")
    if not isinstance(p["suites"], dict) or any(not isinstance(v, dict) for v in p["suites"].values()):
        bad("'suites' maps each suite name to the suite keys the protocol sets ({} for none)")
    if p["expressible"] is not False and not p["suites"]:
        bad("names no suite")
    if not p["seeds"] or any(not isinstance(s, int) for s in p["seeds"]):
        bad("'seeds' is a non-empty list of integers")
    if not isinstance(p["variants"], dict) or not p["variants"]:
        bad("'variants' maps a model name (or default) to a list of {name, steps, guidance}")
    for model, variants in p["variants"].items():
        if not isinstance(variants, list) or not variants or any(not isinstance(v, dict) or not v.get("name") for v in variants):
            bad(f"variants of '{model}' must be a non-empty list of {{name, steps, guidance}}")
        names = [v["name"] for v in variants]
        if len(set(names)) != len(names):
            bad(f"variants of '{model}' repeat a name: {names}")
        unknown = {k for v in variants for k in v} - {"name", "steps", "guidance"}
        if unknown:
            bad(f"variants of '{model}' have unknown keys {sorted(unknown)} (name, steps, guidance)")
    ck = p["checkpoint"] or {}
    if ck.get("select", "final") not in SELECT:
        bad(f"checkpoint.select must be one of {', '.join(SELECT)}")
    if ck.get("select", "final") != "final" and ck.get("metric") not in p["metrics"]:
        bad(f"checkpoint.metric must be one of the protocol's metrics {list(p['metrics'])}")
    return p


def variants_for(p: dict, model: str) -> list[dict]:
    """The sampler settings the protocol evaluates ``model`` with (its own entry, else ``default``)."""
    return p["variants"].get(model) or p["variants"].get("default") or []


def status(p: dict) -> str:
    """What ``bench ls protocols`` appends to the description: nothing, or why it is not (fully) expressible."""
    limits = p.get("limits") or []
    if p["expressible"] is False:
        return f" [NOT EXPRESSIBLE: {limits[0]}]"
    if p["expressible"] == "partly":
        return f" [partly: {'; '.join(limits)}]"
    return ""


def describe_rows(rows: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """``bench ls protocols``: each protocol's description and, where it is not (fully) expressible, why."""
    from bench.config import load_entry_config, to_dict
    from bench.registry import PROTOCOLS

    out = []
    for name, description in rows:
        try:
            p = validate(to_dict(load_entry_config(PROTOCOLS, name)))
        except UsageError as err:
            out.append((name, f"{description} [INVALID: {err}]"))
            continue
        out.append((name, p["description"] + status(p)))
    return out


def _flatten(prefix: str, tree: dict) -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(f"{prefix}{key}.", value))
        else:
            out[f"{prefix}{key}"] = value
    return out


def expand(cfg: dict, args: list[str]) -> list[dict]:
    """Every evaluation (cell) of the protocol for this model: suite x variant x seed [x subject].

    A cell is ``{"suite", "set", "record"}``: the suite to load, the settings it puts on top of the
    suite and method (``seed``, ``gen.steps``, ``suite.metrics``, ...) and what the manifest records."""
    p = validate(cfg["protocol"])
    if p["expressible"] is False:
        raise UsageError(f"protocol '{p['name']}' cannot run in this harness: {'; '.join(p['limits'])}")
    from bench.config import parse_overrides

    fixed = [k for k, _ in parse_overrides(args) if k in FIXED or any(k.startswith(f + ".") for f in FIXED if f != "suite")]
    if fixed:
        raise UsageError(
            f"protocol '{p['name']}' fixes {', '.join(fixed)}: change the protocol instead (protocol.seeds=[0], "
            "protocol.suites.NAME.KEY=VALUE), or evaluate without protocol="
        )
    model = p.get("model") or cfg["model"]["name"]
    variants = variants_for(p, model)
    if not variants:
        listed = ", ".join(m for m in p["variants"] if m != "default")
        raise UsageError(f"protocol '{p['name']}' does not evaluate model '{model}' (it names {listed}); protocol.model=NAME evaluates a stand-in as NAME")
    select = (p["checkpoint"] or {}).get("select", "final")
    cells = []
    for suite, keys in p["suites"].items():
        subjects = [cfg.get("subject")] if cfg.get("subject") or not p.get("per_subject") else _subjects(suite, keys, args)
        for variant in variants:
            for seed in p["seeds"]:
                for subject in subjects:
                    settings = {"seed": int(seed), "suite.images_per_prompt": int(p["images_per_prompt"]), "suite.metrics": list(p["metrics"])}
                    settings.update({f"gen.{k}": v for k, v in variant.items() if k in ("steps", "guidance")})
                    settings.update(_flatten("suite.", keys))
                    if subject:
                        settings["subject"] = subject
                    if select != "final":
                        settings["train.keep_checkpoints"] = True
                        if (p["checkpoint"] or {}).get("every"):
                            settings["train.save_every"] = int(p["checkpoint"]["every"])
                    record = {
                        "name": p["name"], "paper": p.get("paper"), "tables": list(p.get("tables") or []), "suite": suite,
                        "variant": variant["name"], "seed": int(seed), "subject": subject, "model": model,
                        "seeds": [int(s) for s in p["seeds"]], "checkpoint_select": select, "overrides": overrides_of(args),
                    }
                    cells.append({"suite": suite, "set": settings, "record": record})
    return cells


def _subjects(suite: str, keys: dict, args: list[str]) -> list[str]:
    """The subjects of a DreamBench suite (a per-subject protocol trains and evaluates each)."""
    from bench.config import compose, to_dict
    from bench.io import cache_root
    from bench.suite import load_suite

    cfg = to_dict(compose(args, cell={"suite": suite, "set": _flatten("suite.", keys)}))
    found = load_suite(cfg["suite"], None, cache_root(cfg)).subjects
    if not found:
        raise UsageError(f"suite '{suite}' has no subjects; per_subject protocols need a dreambench suite")
    return list(found)


def run_protocol(args: list[str], train: bool = True, progress: bool = True) -> list[dict]:
    """Run every cell of ``protocol=NAME``: the base model, and with ``train`` the method trained
    once (per subject) and evaluated in every cell; returns one entry per cell."""
    from bench.config import compose, to_dict
    from bench.io import write_json
    from bench.runner import Session
    from bench.trainer import kept_checkpoints

    cfg0 = to_dict(compose(args, require=("protocol", "method") if train else ("protocol",)))
    if cfg0["gen"].get("shard"):
        raise UsageError("gen.shard generates one suite's images; run the protocol without it")
    cells = expand(cfg0, args)
    p = cfg0["protocol"]
    select = (p["checkpoint"] or {}).get("select", "final")
    trained: dict = {}
    out = []
    for i, cell in enumerate(cells):
        rec = cell["record"]
        log.info("protocol %s: cell %d/%d (suite %s, %s, seed %d%s)", p["name"], i + 1, len(cells), rec["suite"], rec["variant"], rec["seed"], f", subject {rec['subject']}" if rec["subject"] else "")
        session = Session(compose(args, cell=cell), progress)
        if train:
            session.check_run()
        base = session.evaluate(None, "base")
        entry = {"cell": rec, "base": base, "runs": [], "selected": None}
        out.append(entry)
        if not train:
            continue
        if rec["subject"] not in trained:  # one training (per subject) for every cell
            trained[rec["subject"]] = session.train()
        final = trained[rec["subject"]]
        method = session.cfg["method"]["name"]
        if select == "final":
            entry["runs"] = [session.evaluate(final, method, baseline=base)]
            entry["selected"] = entry["runs"][0]
            continue
        candidates = kept_checkpoints(final)
        runs = [(step, session.evaluate(ck, f"{method}@step{step}", baseline=base, protocol_extra={"checkpoint_step": step})) for step, ck in candidates]
        metric = p["checkpoint"]["metric"]
        values = {step: selection_value(r.summary, metric) for step, r in runs}
        finite = {s: v for s, v in values.items() if v is not None}
        if not finite:
            raise UsageError(f"protocol '{p['name']}': no checkpoint has a value of {metric} to select by")
        chosen = min(finite, key=lambda s: (finite[s] if select == "lowest" else -finite[s], s))  # the best value; the earliest step on a tie
        for step, r in runs:  # every candidate's manifest says which one the protocol keeps
            path = r.run_dir / "manifest.json"
            manifest = json.loads(path.read_text())
            manifest["protocol"]["selection"] = {"metric": metric, "select": select, "values": {str(s): v for s, v in values.items()}, "chosen_step": chosen, "selected": step == chosen}
            write_json(path, manifest)
        entry["runs"] = [r for _, r in runs]
        entry["selected"] = dict(runs)[chosen]
    return out


def selection_value(summary: dict, metric: str) -> float | None:
    """A run's value of the selection metric: a set-level one (FID) or a per-image mean."""
    if metric in (summary.get("sets") or {}):
        return summary["sets"][metric]["value"]
    if metric in summary.get("metrics", {}):
        return summary["metrics"][metric]["mean"]
    return None


def render(entries: list[dict]) -> str:
    """One line per cell: where its base and tuned runs are (and which checkpoint was kept)."""
    import pandas as pd

    from bench.report import _markdown

    rows = []
    for e in entries:
        c = e["cell"]
        chosen = e["selected"]
        rows.append(
            {
                "suite": c["suite"] + (f" ({c['subject']})" if c["subject"] else ""),
                "variant": c["variant"],
                "seed": str(c["seed"]),
                "base run": e["base"].run_dir.name,
                "tuned run": chosen.run_dir.name if chosen is not None else "-",
                **({"checkpoints evaluated": str(len(e["runs"]))} if len(e["runs"]) > 1 else {}),
            }
        )
    return _markdown(pd.DataFrame(rows).fillna("-"))

