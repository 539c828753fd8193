"""The minikube and k3s flows: ``model`` (manifests, Kata config and pure functions),
``k3s`` (the guide's k3s lab), ``prereq`` (probes naming the exact missing piece).
"""
