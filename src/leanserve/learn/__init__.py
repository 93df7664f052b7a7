"""New versions from new data: online updates from labelled feedback (``online``, ``learner``)."""
