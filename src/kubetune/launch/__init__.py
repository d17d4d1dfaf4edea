"""Starting the pipeline: on this machine (kfp.local, in-process or in containers) or on a cluster.

The layer above the KFP DAG (kubetune.pipelines) and below the command line: the only library
code that imports the pipeline. local runs it under kfp.local, container_runner runs each task in
its image through podman, cluster compiles, uploads, runs and schedules it through the KFP API.
"""
