#!/bin/sh
# Kafka's own tool, as the distribution's script of the same name runs it (the health check).
exec java -cp "/opt/kafka/libs/*" org.apache.kafka.tools.BrokerApiVersionsCommand "$@"
