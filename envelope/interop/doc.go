// Package interop holds only tests: kubekms's envelope code against the
// real k8s.io/apiserver transformer, in both directions.
package interop
