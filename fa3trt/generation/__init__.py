"""Generation: the denoising loop on the server, batched step by step across requests.

- ``config``: the generation app's arguments (``GenerationArgs``);
- ``requests``: one request checked field by field (``parse_request``);
- ``family``: what the loop needs of a transformer family (``family_for`` picks it by class);
  ``flux`` and ``sd3``: FLUX-style and SD3-style transformers, step for step as diffusers'
  ``FluxPipeline`` and ``StableDiffusion3Pipeline``;
- ``parts``: a part's config and loading (transformer, text encoders, VAE);
- ``policy``: which requests run the next pass (earliest deadline first, or FIFO), the cost
  model and the admission estimate;
- ``engine``: the requests in flight and their passes (``StepEngine``);
- ``text`` and ``vae``: prompts to embeddings and latents to PNGs, as the pipeline does them.

No Ray here: ``deploy.generation`` serves it.
"""

from fa3trt.generation.config import GenerationArgs
from fa3trt.generation.engine import Generation, StepEngine
from fa3trt.generation.family import Family, family_for
from fa3trt.generation.flux import FluxFamily
from fa3trt.generation.requests import GenerateRequest, parse_request

__all__ = [
    "GenerationArgs",
    "GenerateRequest",
    "parse_request",
    "Family",
    "family_for",
    "FluxFamily",
    "Generation",
    "StepEngine",
]
