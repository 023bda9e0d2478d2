"""Jobs: whether a fire is honoured and the ResticJob it yields (fires.py), and the dispatch of
ResticJobs to their agents (dispatch.py)."""
