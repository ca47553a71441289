#!/usr/bin/env bash
# The network of cluster/gcp.yaml, created once before the first `ray up`:
#   GCP_PROJECT=my-project SSH_CIDR=$(curl -s https://checkip.amazonaws.com)/32 bash cluster/gcp-network.sh
# A VPC network `ray-crm` with one subnet `ray-crm` (SUBNET_RANGE, default 10.10.0.0/20) in REGION (default
# us-central1, as gcp.yaml) and two firewall rules: SSH (tcp 22) from SSH_CIDR only, and all traffic between
# the subnet's nodes (Ray's ports). SSH_CIDR has no default: give your address (/32) or your network's range
# (35.235.240.0/20 admits `gcloud compute ssh --tunnel-through-iap`). Outbound traffic is open (image pulls,
# pip). The project's `default` network, whose rules open SSH and RDP to every address, is not used. To change
# SSH_CIDR later: gcloud compute firewall-rules update ray-crm-ssh --source-ranges=NEW_CIDR
set -euo pipefail

: "${GCP_PROJECT:?set GCP_PROJECT to provider.project_id of cluster/gcp.yaml}"
: "${SSH_CIDR:?set SSH_CIDR to the address range allowed to SSH into the nodes, e.g. 203.0.113.7/32}"
REGION=${REGION:-us-central1}
SUBNET_RANGE=${SUBNET_RANGE:-10.10.0.0/20}

gcloud compute networks create ray-crm --project="$GCP_PROJECT" --subnet-mode=custom
gcloud compute networks subnets create ray-crm --project="$GCP_PROJECT" --network=ray-crm \
  --region="$REGION" --range="$SUBNET_RANGE"
gcloud compute firewall-rules create ray-crm-ssh --project="$GCP_PROJECT" --network=ray-crm \
  --direction=INGRESS --allow=tcp:22 --source-ranges="$SSH_CIDR"
gcloud compute firewall-rules create ray-crm-internal --project="$GCP_PROJECT" --network=ray-crm \
  --direction=INGRESS --allow=tcp,udp,icmp --source-ranges="$SUBNET_RANGE"
