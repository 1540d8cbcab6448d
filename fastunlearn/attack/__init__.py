"""Concept-recovery attacks: after unlearning, can an attacker get the concept back, and how cheaply?

    python -m fastunlearn.attack --original digits --unlearned outputs/digits-saddle --concept 3 --out outputs/attack

Both attacks work on the unlearned model θu with the ORIGINAL model's own samples x_0 of the forget
prompts (data-free, cached like a training run's; or the user's images with --forget-data-dir), and are
scored by the concept's rate in what the attacked model then draws (the judge; digits world: the digit
classifier) and by the denoising loss. Every formula is in docs/attacks.md.

* Concept Inversion (textual inversion, Pham et al. 2023): a new token <c*> whose embedding row e (one per
  text encoder; SDXL has two) is the only thing optimised; every other row stays as it was:

      e* = argmin_e  E_{x_0, ε, t} ‖ε_θu(x_t, t, c_f[w → <c*>]) − y‖²,   x_t = add_noise(x_0, ε, t)

  c_f[w → <c*>] is a forget prompt with its concept word w replaced by <c*>, t ~ U{0..T−1}, and y is the
  model's output space: ε (epsilon), α_t ε − σ_t x_0 (v-prediction) or x_0 (sample).
  AdamW(lr 5e-3, wd 1e-2), batch 16, 1,000 steps, evaluated at 0 / 100 / 300 / 1,000 steps.
* Prompt search (UnlearnDiffAtk-style, discrete): a prefix p of up to k = 2 vocabulary words before each
  forget prompt, p* = argmin_p ‖ε_θu(x_t, t, p ⊕ c_f) − y‖² on one fixed batch; exhaustive when the
  vocabulary is small, else a greedy coordinate search over gradient-ranked words (HotFlip).

Controls: the same attack on the original model θ0 (it must recover the concept, else the attack is too
weak to conclude anything), the 0-step embedding (the init word) and the attack aimed at a retained concept.

The package: concepts (AttackConfig, the concept's data), encoding (differentiable prompt encoding and the
denoising loss), inversion, prompt_search, controls (judge, world concept, same-model check), run (run_attack)
and command (main).
"""
from .command import main
from .concepts import ATTACKS, TOKEN, AttackConfig, ConceptData, concept_data, output_target, replace_concept
from .controls import WorldConcept, check_same_model, judged, world_concept
from .encoding import denoise_loss, encode, encoders, unet_kwargs
from .inversion import InvertedToken, invert, load_embedding, save_embedding
from .prompt_search import prefix_losses, search, vocabulary
from .run import run_attack

__all__ = [
    "ATTACKS", "TOKEN", "AttackConfig", "ConceptData", "InvertedToken", "WorldConcept", "check_same_model",
    "concept_data", "denoise_loss", "encode", "encoders", "invert", "judged", "load_embedding", "main",
    "output_target", "prefix_losses", "replace_concept", "run_attack", "save_embedding", "search", "unet_kwargs",
    "vocabulary", "world_concept",
]
