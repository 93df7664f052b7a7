"""Fairness: per-group rates and gaps from delayed labels (``metrics``) and bias mitigation as a
served, post-processed version (``mitigate``, ``leanserve mitigate``). Needs ``leanserve[fairness]``."""
