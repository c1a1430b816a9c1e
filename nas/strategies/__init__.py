"""Search strategies, one module each, over one supernet and one cost model (shared parts: base, knapsack)."""
