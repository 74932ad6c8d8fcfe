"""`make bench`: run every benchmark and print its figures."""

from bench import agent_overhead, client, console, detection, fleet, goodput, ingest

agent_overhead.main([])
detection.main(["--quick"])
goodput.main([])
console.main()
ingest.main([])
client.main([])
fleet.main([])
