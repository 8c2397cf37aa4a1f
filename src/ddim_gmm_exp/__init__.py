"""DDIM-GMM: DDIM sampling with moment-matched Gaussian-mixture reverse kernels.

An independent implementation of Gabbur, "Improved DDIM Sampling with Moment Matching Gaussian
Mixtures" (TMLR 2026, arXiv 2311.04938); see docs/method.md.

    from ddim_gmm_exp import DDIMSampler, GMM             # CompVis / LDM interface
    from ddim_gmm_exp.diffusers import DDIMScheduler      # diffusers interface
"""

from ddim_gmm_exp.gmm import GMM, GMMHyperparameters
from ddim_gmm_exp.ldm import DDIMSampler
from ddim_gmm_exp.noise import sample_generators
from ddim_gmm_exp.sampling import ddim_step, kernel_noise, sample_ddim

__all__ = [
    "GMM",
    "GMMHyperparameters",
    "DDIMSampler",
    "sample_generators",
    "ddim_step",
    "kernel_noise",
    "sample_ddim",
]
__version__ = "0.1.0"
