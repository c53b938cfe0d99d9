package tpm

import (
	"fmt"
	"net/url"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/google/go-tpm/tpm2"
)

// Scheme is the key-URI scheme of this backend.
const Scheme = "tpm"

const uriForm = "tpm:///dev/tpmrm0?handle=0x81000100[-0x8100010f][&pcrs=7,16][&peers=/abs/path]"

// Persistent handles of the owner hierarchy (TPM 2.0 Part 2, 29.4).
const (
	minPersistent tpm2.TPMHandle = 0x81000000
	maxPersistent tpm2.TPMHandle = 0x817FFFFF
	maxRange                     = 256
)

// KeyURI is a parsed tpm key URI.
type KeyURI struct {
	// Device is the TPM: a character device (/dev/tpmrm0, the kernel's
	// resource manager) or a unix socket speaking raw TPM commands (swtpm).
	Device string
	// First and Last bound the persistent handles this node's keys live
	// at; the highest occupied one is current. A rotation persists a new
	// key at a higher handle.
	First, Last tpm2.TPMHandle
	// PCRs (SHA-256 bank) the current key's policy is bound to; empty for
	// no PCR binding.
	PCRs []uint
	// Peers is the file with every node's public key (HA); empty for one
	// node.
	Peers string
}

// ParseURI parses
//
//	tpm:///dev/tpmrm0?handle=0x81000100[-0x8100010f][&pcrs=7,16][&peers=/etc/kubekms/tpm-peers]
func ParseURI(uri string) (KeyURI, error) {
	u, err := url.Parse(uri)
	if err != nil {
		return KeyURI{}, fmt.Errorf("key URI: %w", err)
	}
	if !strings.EqualFold(u.Scheme, Scheme) {
		return KeyURI{}, fmt.Errorf("key URI: scheme is not %s: want %s", Scheme, uriForm)
	}
	if u.Host != "" || u.User != nil || u.Fragment != "" || u.Opaque != "" {
		return KeyURI{}, fmt.Errorf("key URI: want an empty host (three slashes), no user info or fragment: %s", uriForm)
	}
	if !filepath.IsAbs(u.Path) || filepath.Clean(u.Path) != u.Path {
		return KeyURI{}, fmt.Errorf("key URI: device %q is not a clean absolute path: want %s", u.Path, uriForm)
	}
	out := KeyURI{Device: u.Path}
	q := u.Query()
	for opt, vals := range q {
		if len(vals) != 1 || vals[0] == "" {
			return KeyURI{}, fmt.Errorf("key URI: option %s= must be given once, not empty", opt)
		}
		v := vals[0]
		switch opt {
		case "handle":
			if out.First, out.Last, err = parseHandles(v); err != nil {
				return KeyURI{}, fmt.Errorf("key URI: %w", err)
			}
		case "pcrs":
			if out.PCRs, err = parsePCRs(v); err != nil {
				return KeyURI{}, fmt.Errorf("key URI: %w", err)
			}
		case "peers":
			if !filepath.IsAbs(v) {
				return KeyURI{}, fmt.Errorf("key URI: peers=%q is not an absolute path", v)
			}
			out.Peers = v
		default:
			return KeyURI{}, fmt.Errorf("key URI: unknown option %q (want handle, pcrs or peers)", opt)
		}
	}
	if out.First == 0 {
		return KeyURI{}, fmt.Errorf("key URI: handle= is required: %s", uriForm)
	}
	return out, nil
}

func parseHandle(s string) (tpm2.TPMHandle, error) {
	n, err := strconv.ParseUint(s, 0, 32)
	h := tpm2.TPMHandle(n)
	if err != nil || h < minPersistent || h > maxPersistent {
		return 0, fmt.Errorf("handle %q is not a persistent owner handle (0x81000000 to 0x817fffff)", s)
	}
	return h, nil
}

func parseHandles(v string) (first, last tpm2.TPMHandle, err error) {
	a, b, isRange := strings.Cut(v, "-")
	if first, err = parseHandle(a); err != nil {
		return 0, 0, err
	}
	last = first
	if isRange {
		if last, err = parseHandle(b); err != nil {
			return 0, 0, err
		}
	}
	if last < first || last-first >= maxRange {
		return 0, 0, fmt.Errorf("handle range %s: want FIRST-LAST with FIRST <= LAST and at most %d handles", v, maxRange)
	}
	return first, last, nil
}

func parsePCRs(v string) ([]uint, error) {
	var out []uint
	for _, p := range strings.Split(v, ",") {
		n, err := strconv.ParseUint(p, 10, 8)
		if err != nil || n > 23 {
			return nil, fmt.Errorf("pcrs=%q: want PCR numbers 0 to 23, comma-separated", v)
		}
		if !slices.Contains(out, uint(n)) {
			out = append(out, uint(n))
		}
	}
	slices.Sort(out)
	return out, nil
}

// pcrMask is a PCR list as a bitmask (bit n = PCR n).
func pcrMask(pcrs []uint) uint32 {
	var m uint32
	for _, p := range pcrs {
		m |= 1 << p
	}
	return m
}

func maskPCRs(m uint32) []uint {
	var out []uint
	for i := uint(0); i < 24; i++ {
		if m&(1<<i) != 0 {
			out = append(out, i)
		}
	}
	return out
}

func formatPCRs(pcrs []uint) string {
	if len(pcrs) == 0 {
		return "-"
	}
	s := make([]string, len(pcrs))
	for i, p := range pcrs {
		s[i] = strconv.Itoa(int(p))
	}
	return strings.Join(s, ",")
}
