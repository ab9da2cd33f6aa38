"""A micro world in which every number means something (issue 21).

Scenes of 1-4 colored shapes drawn from a seeded grammar (``scene``), rendered exactly
(``render``), and judged by an exact evaluator in GenEval's manner (``evaluate``): so a model
trained on the world (``model``) can be scored against the truth, and a reward that is hacked shows
up: the gold utility (``gold``) against the learned preference trained to stand in for it (``scorers``).
See ``docs/world.md``; ``python -m bench.world --table`` prints the evaluator's degradation table.
"""

from bench.world.evaluate import Detection, degradation_table, degrade, detect, evaluate, score
from bench.world.render import render
from bench.world.scene import COLORS, PALETTE, RELATIONS, SHAPES, TAGS, Obj, Scene, caption_of, judge, layout, make_prompts, make_scene, read_specs, write_prompt_file

__all__ = [
    "COLORS", "PALETTE", "RELATIONS", "SHAPES", "TAGS", "Detection", "Obj", "Scene", "caption_of", "degradation_table", "degrade",
    "detect", "evaluate", "judge", "layout", "make_prompts", "make_scene", "read_specs", "render", "score", "write_prompt_file",
]
