"""jobsd: a local, faithful implementation of the AWS IoT Jobs service (see tools/jobsd)."""
