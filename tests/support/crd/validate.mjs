// Validate Prometheus Operator and KEDA objects against their CRD schemas: `node validate.mjs FILE...`.
// Prints one line per object and exits 1 if any is invalid (or of a kind this script does not know).
import { readFileSync } from "node:fs";
import yaml from "js-yaml";
import * as monitoring from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1";
import * as keda from "@kubernetes-models/keda/keda.sh/v1alpha1";

const KINDS = {
  "monitoring.coreos.com/v1": monitoring,
  "keda.sh/v1alpha1": keda,
};

let failed = 0;
for (const file of process.argv.slice(2)) {
  for (const doc of yaml.loadAll(readFileSync(file, "utf8"))) {
    if (!doc) continue;
    const models = KINDS[doc.apiVersion];
    const Model = models && models[doc.kind];
    const name = `${doc.apiVersion} ${doc.kind} ${doc.metadata?.name}`;
    if (!Model) {
      console.log(`UNKNOWN ${name} in ${file}`);
      failed++;
      continue;
    }
    try {
      new Model(doc).validate();
      console.log(`VALID ${name}`);
    } catch (err) {
      console.log(`INVALID ${name} in ${file}: ${err.message}`);
      failed++;
    }
  }
}
process.exit(failed ? 1 : 0);
