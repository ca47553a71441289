#!/usr/bin/env bash
# The security group of cluster/aws.yaml, created once before the first `ray up`:
#   SSH_CIDR=$(curl -s https://checkip.amazonaws.com)/32 bash cluster/aws-network.sh
# It opens SSH (tcp 22) from SSH_CIDR only, plus all traffic between the group's own nodes (Ray's ports).
# SSH_CIDR has no default: give your address (/32) or your network's range. Outbound traffic is open (image
# pulls, pip). Paste the printed id into SecurityGroupIds in cluster/aws.yaml. With its own group on every node
# type, the launcher creates none: the group Ray would create opens SSH to every address.
# REGION (default us-east-1, as aws.yaml), VPC_ID (default: the region's default VPC) and GROUP_NAME (default
# ray-crm) may be set too. To change SSH_CIDR later:
#   aws ec2 revoke-security-group-ingress  --group-id SG --protocol tcp --port 22 --cidr OLD_CIDR
#   aws ec2 authorize-security-group-ingress --group-id SG --protocol tcp --port 22 --cidr NEW_CIDR
set -euo pipefail

: "${SSH_CIDR:?set SSH_CIDR to the address range allowed to SSH into the nodes, e.g. 203.0.113.7/32}"
REGION=${REGION:-us-east-1}
GROUP_NAME=${GROUP_NAME:-ray-crm}
VPC_ID=${VPC_ID:-$(aws ec2 describe-vpcs --region "$REGION" --filters Name=isDefault,Values=true \
  --query 'Vpcs[0].VpcId' --output text)}

SG=$(aws ec2 create-security-group --region "$REGION" --vpc-id "$VPC_ID" --group-name "$GROUP_NAME" \
  --description "ray-crm: SSH from $SSH_CIDR, all traffic between the cluster's nodes" \
  --query GroupId --output text)
aws ec2 authorize-security-group-ingress --region "$REGION" --group-id "$SG" \
  --protocol tcp --port 22 --cidr "$SSH_CIDR" >/dev/null
aws ec2 authorize-security-group-ingress --region "$REGION" --group-id "$SG" \
  --protocol -1 --source-group "$SG" >/dev/null
echo "$SG"
