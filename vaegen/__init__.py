"""vaegen's ground floor: the file contracts the stages talk through (stores, shards, DM runs, VAE runs), each
with its writer and its reader, and what every stage shares (seeding, provenance, locks, signals, launchers,
options, errors). It imports no stage; the stages (generator/, trainer/, evaluator/) and the orchestration on top
(studies/) import it."""

__version__ = "0.1.0"
