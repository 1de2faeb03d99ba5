"""The drift benchmark: a stream of workload phases, replayed exactly on recorded greedy traces or run live."""
