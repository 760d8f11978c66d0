// Validate the custom resources in deploy/k8s against their published schemas
// (@kubernetes-models/keda, @kubernetes-models/prometheus-operator, installed by scripts/setup
// into runtime/node). Usage: node tests/deploy/validate_crds.mjs FILE...
// Prints one line per resource; exits 1 on an invalid resource or an unknown kind.
import fs from "node:fs";
import path from "node:path";
import { pathToFileURL, fileURLToPath } from "node:url";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
const mod = (p) => import(pathToFileURL(path.join(root, "runtime/node/node_modules", p)).href);
const yaml = (await mod("js-yaml/index.js")).default;
const keda = await mod("@kubernetes-models/keda/keda.sh/v1alpha1/index.js");
const monitoring = await mod("@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/index.js");

const models = {
  "keda.sh/v1alpha1/ScaledObject": keda.ScaledObject,
  "keda.sh/v1alpha1/TriggerAuthentication": keda.TriggerAuthentication,
  "monitoring.coreos.com/v1/ServiceMonitor": monitoring.ServiceMonitor,
  "monitoring.coreos.com/v1/PrometheusRule": monitoring.PrometheusRule,
};

let checked = 0;
for (const file of process.argv.slice(2)) {
  for (const doc of yaml.loadAll(fs.readFileSync(file, "utf8"))) {
    if (!doc) continue;
    const key = `${doc.apiVersion}/${doc.kind}`;
    const Model = models[key];
    if (!Model) {
      console.error(`${file}: no schema for ${key}`);
      process.exit(1);
    }
    try {
      new Model(doc).validate();
    } catch (e) {
      console.error(`${file}: ${key} ${doc.metadata?.name}: ${e.message}`);
      process.exit(1);
    }
    console.log(`${file}: ${key} ${doc.metadata.name} valid`);
    checked++;
  }
}
if (checked === 0) {
  console.error("no resources checked");
  process.exit(1);
}
