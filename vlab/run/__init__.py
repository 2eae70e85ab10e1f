"""Running experiments: the declarations and registry, the plan, the pyperf runner and its worker,
the rows derived from traces, and the summary printed at the end of a run."""
