#!/bin/bash
# One scout role on this node; run by deploy/slurm/scout.sbatch through srun (one task per node),
# with the job's parameters in the environment. SCOUT_DRY_RUN=1 prints the command instead.
#
#   scout-role.sh retriever | learner | actor
set -euo pipefail

role="${1:?usage: scout-role.sh retriever|learner|actor}"
cd "${SCOUT_DIR:?}"
PY="${SCOUT_PYTHON:?}"
BIND="${BIND_HOST:-0.0.0.0}"  # where servers listen; 0.0.0.0 = every interface of the node

# every role: the run's TOML, binds beyond loopback allowed, metrics reachable from Prometheus,
# CURVE authentication on every ZeroMQ socket when a key folder is given
common=(--config "${SCOUT_CONFIG:?}" --set transport.allow_external_bind=true --set "metrics.host=${BIND}")
if [[ -n "${SCOUT_CURVE_DIR:-}" ]]; then
  common+=(--set "transport.curve_dir=${SCOUT_CURVE_DIR}")
fi

case "$role" in
  retriever)
    cmd=("$PY" cli.py retriever --index "${SCOUT_INDEX:?}" --endpoint "tcp://${BIND}:${RETRIEVER_PORT:-5555}"
         --http-port "${RETRIEVER_HTTP_PORT:-8000}" "${common[@]}" --set "retriever.http_host=${BIND}"
         --set "metrics.retriever_port=${RETRIEVER_METRICS_PORT:-9100}")
    if [[ -n "${RETRIEVER_GPUS:-}" ]]; then
      cmd+=(--gpus "$RETRIEVER_GPUS")
    fi
    ;;
  learner)
    # static rendezvous: node rank = this task's rank in the step, so rank 0 (ingest, weight sync,
    # metrics) lands on the first learner node, whose address the actors were given.
    # The sync endpoint is bound on the node's address (not 0.0.0.0): the learner tells actors
    # the endpoint it bound, so it must be one they can reach.
    cmd=("$PY" -m torch.distributed.run --nnodes "${LEARNER_NODES:?}" --nproc-per-node "$(( ${GPUS_PER_NODE:-0} > 0 ? GPUS_PER_NODE : 1 ))"
         --node-rank "${SLURM_PROCID:?}" --master-addr "${LEARNER_ADDR:?}" --master-port "${TORCH_PORT:-29500}"
         cli.py learner "${common[@]}"
         --set "learner.ingest_endpoint=tcp://${BIND}:${INGEST_PORT:-5600}"
         --set "learner.sync_endpoint=tcp://${LEARNER_ADDR}:${SYNC_PORT:-5601}"
         --set "learner.store_host=${LEARNER_ADDR}" --set "learner.store_port=${STORE_PORT:-29600}"
         --set "metrics.learner_port=${LEARNER_METRICS_PORT:-9300}")
    ;;
  actor)
    if (( ${GPUS_PER_NODE:-0} > 0 )); then devices=(--gpus all); else devices=(--workers "${ACTOR_WORKERS:-1}"); fi
    cmd=("$PY" cli.py actor "${devices[@]}" "${common[@]}"
         --set "actor.learner_endpoint=tcp://${LEARNER_ADDR:?}:${INGEST_PORT:-5600}"
         --set "actor.retriever_endpoint=tcp://${RETRIEVER_ADDR:?}:${RETRIEVER_PORT:-5555}"
         --set "metrics.actor_port=${ACTOR_METRICS_PORT:-9200}")
    ;;
  *)
    echo "error: unknown role $role (expected retriever, learner or actor)" >&2
    exit 2
    ;;
esac

if [[ "${SCOUT_DRY_RUN:-0}" == 1 ]]; then
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
echo "$(hostname): ${cmd[*]}" >&2
exec "${cmd[@]}"
