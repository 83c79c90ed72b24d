"""The benchmark suite: the reference workloads of ../shared/WORKLOAD.md against a live server,
beside their floors, measured in one run. A folder of scripts, not part of the installed package.
"""
