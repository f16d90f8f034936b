;;; rlm-repl.el --- A Python REPL bound to an rlm context  -*- lexical-binding: t; -*-

;; Copyright (C) 2026 The rlmd authors

;; Author: The rlmd authors
;; URL: https://github.com/rlmd/rlmd

;; This file is not part of GNU Emacs.

;; This program is free software; you can redistribute it and/or modify
;; it under the terms of the GNU General Public License as published by
;; the Free Software Foundation, either version 3 of the License, or
;; (at your option) any later version.

;; This program is distributed in the hope that it will be useful,
;; but WITHOUT ANY WARRANTY; without even the implied warranty of
;; MERCHANTABILITY or FITNESS FOR A PARTICULAR PURPOSE.  See the
;; GNU General Public License for more details.

;; You should have received a copy of the GNU General Public License
;; along with this program.  If not, see <https://www.gnu.org/licenses/>.
;;; Commentary:

;; `rlm-repl' opens a comint buffer on a REPL session of the daemon
;; (`repl/open {context}'): type Python, see its output.  The session
;; runs in the daemon's sandboxed worker with `context' bound to the
;; context's text and `llm_query' at hand; variables persist between
;; inputs.  Each input is one `repl/exec'; killing the buffer sends
;; `repl/close'.

;;; Code:

(require 'cl-lib)
(require 'comint)
(require 'rlm-client)

(declare-function rlm--read-context "rlm" (&optional prompt))

(defcustom rlm-repl-timeout nil
  "Seconds one input may run in the REPL (timeout_s); nil: the daemon's."
  :type '(choice (const nil) number)
  :group 'rlm)

(defvar-local rlm-repl--session nil
  "The daemon's id of this buffer's REPL session.")

(defvar-local rlm-repl--context nil
  "The context this buffer's REPL is bound to.")

(define-derived-mode rlm-repl-mode comint-mode "rlm-repl"
  "Major mode of a Python REPL in the rlm daemon, bound to a context.
\\{rlm-repl-mode-map}"
  (setq-local comint-prompt-regexp "^>>> ")
  (setq-local comint-input-sender #'rlm-repl--send)
  (setq-local comint-process-echoes nil)
  (add-hook 'kill-buffer-hook #'rlm-repl--close nil t))

(defun rlm-repl--output (buffer text)
  "Show TEXT, then a new prompt, in the REPL BUFFER."
  (when (buffer-live-p buffer)
    (with-current-buffer buffer
      (comint-output-filter (get-buffer-process buffer) (concat text ">>> ")))))

(defun rlm-repl-format-result (result)
  "Return the text to show for RESULT, a `repl/exec' result."
  (let ((out (or (plist-get result :stdout) ""))
        (err (plist-get result :error)))
    (concat out
            (if (and (> (length out) 0) (not (string-suffix-p "\n" out))) "\n" "")
            (if (and (stringp err) (not (string-empty-p err)))
                (propertize (concat (string-trim-right err) "\n") 'font-lock-face 'error)
              "")
            (if (eq (plist-get result :truncated) t)
                (propertize "[output truncated]\n" 'font-lock-face 'shadow)
              ""))))

(defun rlm-repl--send (_proc input)
  "Run INPUT in the daemon's REPL session of this buffer."
  (let ((buffer (current-buffer)))
    (if (string-blank-p input)
        (rlm-repl--output buffer "")
      (jsonrpc-async-request
       (rlm-connection) 'repl/exec
       (rlm--plist :session rlm-repl--session :code input :timeout_s rlm-repl-timeout)
       :success-fn (lambda (result)
                     (rlm-repl--output buffer (rlm-repl-format-result result)))
       :error-fn (lambda (err)
                   (rlm-repl--output
                    buffer (propertize (format "rlm: %s\n" (rlm--error-message err))
                                       'font-lock-face 'error)))
       :timeout nil))))

(defun rlm-repl--close ()
  "Close this buffer's REPL session in the daemon."
  (when (and rlm-repl--session rlm--connection (jsonrpc-running-p rlm--connection))
    (ignore-errors
      (jsonrpc-async-request rlm--connection 'repl/close (list :session rlm-repl--session)
                             :success-fn #'ignore :error-fn #'ignore :timeout-fn #'ignore)))
  (setq rlm-repl--session nil))

;;;###autoload
(defun rlm-repl (context)
  "Open a Python REPL in the daemon with `context' bound to CONTEXT.
Return its buffer."
  (interactive (list (rlm--read-context "REPL on context: ")))
  (let* ((session (plist-get (rlm-request 'repl/open (list :context context)) :session))
         (buffer (generate-new-buffer (format "*rlm repl: %s*" context))))
    (with-current-buffer buffer
      (rlm-repl-mode)
      (setq rlm-repl--session session
            rlm-repl--context context)
      ;; comint wants a process; the real work goes over the daemon's
      ;; socket, so a pipe that never carries anything stands in.
      (let ((proc (make-pipe-process :name "rlm-repl" :buffer buffer :noquery t)))
        (set-process-query-on-exit-flag proc nil)
        (insert (propertize (format "Python in the rlm daemon; `context' is %s (session %s)\n"
                                    context session)
                            'font-lock-face 'shadow))
        (set-marker (process-mark proc) (point))
        (comint-output-filter proc ">>> ")))
    (pop-to-buffer buffer)
    buffer))

(provide 'rlm-repl)
;;; rlm-repl.el ends here
