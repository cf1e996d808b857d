"""Call-compatible entry points for engines that verify drafts with another library today.

Each module is a drop-in for one peer's functions — same argument order, layouts, dtypes and
outputs — built only on fastverify's public ops, so every backend (torch on CPU, Triton and
CUDA on GPU) serves it, and importing none of the peers:

- ``fastverify.integrations.vllm``: vLLM 0.33's ``rejection_sample`` and ``RejectionSampler``
  (``vllm/v1/sample/rejection_sampler.py``), plus a ``vllm.general_plugins`` entry point
  (``register``) that installs the module in a running vLLM.
- ``fastverify.integrations.flashinfer``: FlashInfer 0.7's ``chain_speculative_sampling``.
- ``fastverify.integrations.sglang``: sgl-kernel 0.3.21's ``verify_tree_greedy``,
  ``tree_speculative_sampling_target_only`` and ``build_tree_kernel_efficient``.

Import the module you need (``from fastverify.integrations.vllm import rejection_sample``);
this package imports none of them, so using one never loads the others.
"""
