"""convoy launchers: horovodrun wrapper, local multi-worker cluster, Horovod install script."""
