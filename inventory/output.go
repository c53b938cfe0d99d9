package inventory

import (
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"slices"
	"text/tabwriter"
)

// WriteTable prints the report as an aligned table with a TOTAL line.
func WriteTable(w io.Writer, rep *Report) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	stale := func(n int) string {
		if rep.CurrentKeyID == "" && rep.ReadWith == "" {
			return "?"
		}
		return fmt.Sprint(n)
	}
	fmt.Fprintln(tw, "RESOURCE\tOBJECTS\tENCRYPTED\tUNENCRYPTED\tSTALE\tUNREADABLE\tPROVIDERS\tKEY IDS")
	for _, r := range rep.Resources {
		fmt.Fprintf(tw, "%s\t%d\t%d\t%d\t%s\t%d\t%s\t%s\n", r.Resource, r.Objects, r.Encrypted, r.Unencrypted,
			stale(r.Stale), r.Unreadable, formatCounts(r.Providers, 32), formatCounts(r.KeyIDs, 40))
	}
	t := rep.Totals
	fmt.Fprintf(tw, "TOTAL\t%d\t%d\t%d\t%s\t%d\t\t\n", t.Objects, t.Encrypted, t.Unencrypted, stale(t.Stale), t.Unreadable)
	if err := tw.Flush(); err != nil {
		return err
	}
	for _, id := range slices.Sorted(maps.Keys(rep.KeyNames)) {
		fmt.Fprintf(w, "key_id %s is %s\n", id, rep.KeyNames[id])
	}
	if rep.ReadWith != "" {
		_, err := fmt.Fprintf(w, "\nEvery value read with %s: STALE is what the apiserver reads as stale, UNREADABLE includes what it could not read.\n", rep.ReadWith)
		return err
	}
	if rep.CurrentKeyID == "" {
		_, err := fmt.Fprintln(w, "\nSTALE is unknown: pass --plugin or --current-key-id to compare against the current key_id.")
		return err
	}
	_, err := fmt.Fprintf(w, "\nCurrent key_id: %s\n", rep.CurrentKeyID)
	return err
}

// WriteJSON prints the report as indented JSON.
func WriteJSON(w io.Writer, rep *Report) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(rep)
}
