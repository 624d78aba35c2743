"""Validates rendered manifests (multi-document YAML, as `kubectl kustomize` prints them).

Built-in kinds go to kubernetes-validate (strict: unknown fields are errors) for the given
Kubernetes version; custom resources to the schemas vendored beside this file, with their
Kubernetes types resolved against the same version's strict schemas. A kind with neither
fails: nothing is passed over silently.

    python validate.py KUBERNETES_VERSION FILE...
"""

import json
import pathlib
import sys

import jsonschema
import referencing
import yaml
from kubernetes_validate import utils

HERE = pathlib.Path(__file__).resolve().parent

# (apiVersion, kind) -> vendored schema (see each file's $comment for its source).
CUSTOM = {
    ("apps.emqx.io/v2beta1", "EMQX"): HERE / "emqx-apps.emqx.io-v2beta1.json",
}


def k8s_definitions(version):
    """The strict `_definitions.json` kubernetes-validate uses for `version`."""
    mm = utils.major_minor(version)
    known = [v for v in utils.all_versions() if utils.major_minor(v) <= mm]
    if not known:
        raise SystemExit(f"kubernetes-validate has no schemas for {version}")
    folder = f"kubernetes-json-schema/v{known[-1]}-local-strict"
    return utils.schema_contents(f"{folder}/_definitions.json", version)


def validate_custom(doc, schema_file, definitions):
    schema = json.loads(schema_file.read_text())
    registry = referencing.Registry().with_resources(
        [
            (definitions["$id"], referencing.Resource.from_contents(definitions)),
            (schema["$id"], referencing.Resource.from_contents(schema)),
        ]
    )
    validator = jsonschema.Draft202012Validator(schema, registry=registry)
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
    return [f"{'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in errors]


def main(argv):
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 64
    version, files = argv[1], argv[2:]
    definitions = k8s_definitions(version)
    failed = checked = 0
    for name in files:
        with open(name) as f:
            docs = [d for d in yaml.safe_load_all(f) if d]
        for doc in docs:
            what = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
            key = (doc.get("apiVersion"), doc.get("kind"))
            if key in CUSTOM:
                problems = validate_custom(doc, CUSTOM[key], definitions)
                how = f"vendored schema {CUSTOM[key].name}"
            else:
                how = f"kubernetes-validate --strict, Kubernetes {version}"
                try:
                    utils.validate(doc, version, strict=True)
                    problems = []
                except utils.SchemaNotFoundError:
                    problems = [f"no schema for {key[0]} {key[1]}: neither Kubernetes nor vendored"]
                except utils.ValidationError as e:
                    path = ".".join(map(str, e.absolute_path)) or "(root)"
                    problems = [f"{path}: {e.message}"]
            checked += 1
            if problems:
                failed += 1
                for p in problems:
                    print(f"FAIL {name}: {what} ({how}): {p}")
    print(f"{checked} resources checked against Kubernetes {version}, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
