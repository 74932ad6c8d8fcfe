"""`make bench`: run every benchmark and print its figures."""

from bench import agent_overhead

agent_overhead.main()
