"""One dynamic partition per `tenant.namespace`."""

import dagster as dg

NAMESPACE_PARTITIONS_NAME = "kolm_namespace"

namespace_partitions = dg.DynamicPartitionsDefinition(name=NAMESPACE_PARTITIONS_NAME)
