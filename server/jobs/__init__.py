"""Jobs: the job and its states, the store backends, the service (submit, cancel, status) and the GPU worker."""
